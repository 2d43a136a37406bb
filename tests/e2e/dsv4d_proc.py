"""Start and stop a real `dsv4d serve` on 127.0.0.1 with a free port (--port 0; the port is read
from the "listening on" log line) for the end-to-end tests."""
import os
import re
import resource
import signal
import subprocess
import threading
import time
import urllib.request


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Server:
    """A dsv4d process. args: extra flags. The log is kept in self.log (list of lines)."""

    def __init__(self, *args, env=None, ready_timeout=120):
        self.bin = os.environ["DSV4D_BIN"]
        cmd = [self.bin, "serve", "--host", "127.0.0.1", "--port", "0", *args]
        e = dict(os.environ)
        # tests run side by side on small machines: one OpenMP thread per server avoids
        # oversubscription (spinning OpenMP teams on shared cores slow everything down)
        e.setdefault("OMP_NUM_THREADS", "1")
        e.update(env or {})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=e, text=True, preexec_fn=_raise_nofile)
        self.log = []
        self.port = None
        self._port_ev = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._port_ev.wait(30) or self.port is None:
            self.stop()
            raise RuntimeError("dsv4d did not start:\n" + "\n".join(self.log))
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_ready(ready_timeout)

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._port_ev.set()
        self._port_ev.set()

    def get(self, path, timeout=10):
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout):
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError("dsv4d exited:\n" + "\n".join(self.log))
            try:
                if self.get("/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("dsv4d not ready in time:\n" + "\n".join(self.log))

    def metric(self, name):
        """The value of a dsv4d: metric (first sample whose name matches exactly)."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith("dsv4d:" + name + "{") or line.startswith("dsv4d:" + name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode
