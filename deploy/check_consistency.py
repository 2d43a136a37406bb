#!/usr/bin/env python3
"""check_consistency.py - the Dockerfile and deploy/k8s agree with each other and with dsv4d.

    python3 deploy/check_consistency.py [--bin BUILD/server/dsv4d] [--meson-setup]

What the schema validators cannot see, read from the sources of truth in this repository:
  flags      every DSV4D_* variable (ConfigMap, Dockerfile ENV, Deployment env) is a flag of
             `dsv4d serve` (server/config.c opts[]); numeric ones parse as numbers
  routes     the probes use /ready (startup, readiness) and /health (liveness), routes that
             server/routes.c serves; the HEALTHCHECK uses /health
  drain      terminationGracePeriodSeconds >= preStop sleep + DSV4D_SHUTDOWN_TIMEOUT + 5 (the
             seconds dsv4d waits after cancelling at the timeout, server/serve.c)
  startup    the startupProbe budget (period x failureThreshold) is at least 10 minutes
  wiring     ports, names, selectors, labels, image, PVC, user id and mounts line up across the
             Deployment, Service, PDB, HPA, PodMonitor, ScaledObject, kustomization, Dockerfile
  image      multi-stage devel -> runtime, non-root USER, exec-form ENTRYPOINT, EXPOSE = port,
             VOLUME /models; the build stage installs the -dev packages deploy/install-deps.sh
             installs; the meson -D options exist in meson_options.txt; with --bin, every shared
             library the binary needs has a runtime package in the final stage; with
             --meson-setup, the Dockerfile's `meson setup` line configures this tree (in a
             temporary directory; -Dcuda=enabled becomes auto where nvcc is missing)
Needs PyYAML. Exit 0 when everything holds, 1 otherwise (each problem on a line).
"""
import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
problems = []

# shared library (NEEDED) -> Ubuntu 24.04 runtime package of the final image stage
RUNTIME_PACKAGES = {
    "libjansson.so.4": "libjansson4",
    "libmicrohttpd.so.12": "libmicrohttpd12t64",
    "libuv.so.1": "libuv1t64",
    "libonig.so.5": "libonig5",
    "libgomp.so.1": "libgomp1",
    # the C++ runtime of the CUDA code (nvcc objects linked into dsv4d)
    "libstdc++.so.6": "libstdc++6",
    "libgcc_s.so.1": "libgcc-s1",
    # glibc, in every base image
    "libc.so.6": None, "libm.so.6": None, "libpthread.so.0": None, "libdl.so.2": None,
    "librt.so.1": None, "ld-linux-x86-64.so.2": None,
    # CUDA runtime libraries, in the nvidia/cuda runtime image
    "libcudart.so.13": None, "libcublas.so.13": None, "libcublasLt.so.13": None,
    "libcuda.so.1": None,
}


def bad(msg):
    problems.append(msg)


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def serve_flags():
    flags = re.findall(r'\{"([a-z][a-z0-9-]*)",\s*OPT_([A-Z]+)', read("server/config.c"))
    if not flags:
        raise SystemExit("check_consistency: no flags found in server/config.c")
    return {"DSV4D_" + f.upper().replace("-", "_"): kind for f, kind in flags}


def check_env(where, name, value, flags):
    if not name.startswith("DSV4D_"):
        return
    if name not in flags:
        bad(f"{where}: {name} is not a `dsv4d serve` flag (server/config.c)")
        return
    if value is not None and flags[name] in ("INT", "SIZE", "DOUBLE"):
        try:
            float(value)
        except ValueError:
            bad(f"{where}: {name}={value!r} is not a number")


def load_k8s():
    objs = {}
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml")) +
                       glob.glob(os.path.join(K8S, "autoscaling", "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if isinstance(doc, dict) and "kind" in doc:
                    objs.setdefault(doc["kind"], []).append((os.path.relpath(path, ROOT), doc))
    return objs


def one(objs, kind):
    found = objs.get(kind, [])
    if len(found) != 1:
        bad(f"deploy/k8s: expected one {kind}, found {len(found)}")
        return None, {}
    return found[0]


def dockerfile():
    """Instructions of the Dockerfile as (stage index, INSTRUCTION, argument text)."""
    text = re.sub(r"\\\n", " ", read("Dockerfile"))
    out, stage = [], -1
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        ins, _, arg = s.partition(" ")
        ins = ins.upper()
        if ins == "FROM":
            stage += 1
        out.append((stage, ins, arg.strip()))
    return out


def check_dockerfile(flags, bin_path, meson_setup):
    ins = dockerfile()
    froms = [a for st, i, a in ins if i == "FROM"]
    if len(froms) < 2:
        bad("Dockerfile: not multi-stage")
    else:
        if "devel" not in froms[0]:
            bad(f"Dockerfile: the build stage is not a CUDA devel image: {froms[0]}")
        if "runtime" not in froms[-1]:
            bad(f"Dockerfile: the final stage is not a CUDA runtime image: {froms[-1]}")
    last = len(froms) - 1
    final = [(i, a) for st, i, a in ins if st == last]
    users = [a for i, a in final if i == "USER"]
    uid = None
    if not users or users[-1].split(":")[0] in ("0", "root"):
        bad("Dockerfile: the final stage does not switch to a non-root USER")
    else:
        uid = users[-1].split(":")[0]
    env = {}
    for i, a in final:
        if i == "ENV":
            for k, v in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", a):
                env[k] = v
    for k, v in env.items():
        check_env("Dockerfile ENV", k, v, flags)
    port = env.get("DSV4D_PORT", "8080")
    exposes = [a for i, a in final if i == "EXPOSE"]
    if not any(port in a.split() for a in exposes):
        bad(f"Dockerfile: EXPOSE {exposes} does not include DSV4D_PORT {port}")
    hc = [a for i, a in final if i == "HEALTHCHECK"]
    if not hc or "/health" not in hc[-1]:
        bad("Dockerfile: no HEALTHCHECK on /health")
    ep = [a for i, a in final if i == "ENTRYPOINT"]
    if not ep:
        bad("Dockerfile: no ENTRYPOINT")
    else:
        try:
            argv = json.loads(ep[-1])
            if not any(x.endswith("/dsv4d") for x in argv):
                bad(f"Dockerfile: the ENTRYPOINT does not run dsv4d: {argv}")
        except ValueError:
            bad("Dockerfile: ENTRYPOINT is not in exec (JSON) form: SIGTERM would go to a shell")
    vols = " ".join(a for i, a in final if i == "VOLUME")
    if "/models" not in vols:
        bad("Dockerfile: no VOLUME for /models")
    # build stage: the -dev packages of deploy/install-deps.sh
    build_runs = " ".join(a for st, i, a in ins if st == 0 and i == "RUN")
    deps = read("deploy/install-deps.sh")
    for pkg in sorted(set(re.findall(r"\blib[a-z0-9.+-]*-dev\b", deps))):
        if pkg not in build_runs.split():
            bad(f"Dockerfile: the build stage does not install {pkg} (deploy/install-deps.sh does)")
    # meson options
    setup = re.search(r"meson setup (.*?)(?:&&|$)", build_runs)
    options = set(re.findall(r"option\('([a-z_0-9]+)'", read("meson_options.txt")))
    builtin = {"buildtype", "prefix", "b_ndebug", "b_sanitize", "optimization", "debug",
               "warning_level", "werror", "default_library", "b_lto", "c_std"}
    args = []
    if not setup:
        bad("Dockerfile: no `meson setup` in the build stage")
    else:
        args = shlex.split(setup.group(1))
        for a in args:
            m = re.match(r"-D([a-z_0-9]+)=", a)
            if m and m.group(1) not in options | builtin:
                bad(f"Dockerfile: meson option -D{m.group(1)} is not in meson_options.txt")
    final_runs = " ".join(a for i, a in final if i == "RUN")
    if bin_path:
        try:
            dyn = subprocess.run(["readelf", "-d", bin_path], capture_output=True, text=True,
                                 check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            bad(f"readelf -d {bin_path}: {e}")
            dyn = ""
        for so in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn):
            if so not in RUNTIME_PACKAGES:
                bad(f"Dockerfile: dsv4d needs {so}: add its Ubuntu runtime package to the final "
                    f"stage and to RUNTIME_PACKAGES in deploy/check_consistency.py")
            elif RUNTIME_PACKAGES[so] and RUNTIME_PACKAGES[so] not in final_runs.split():
                bad(f"Dockerfile: dsv4d needs {so} but the final stage does not install "
                    f"{RUNTIME_PACKAGES[so]}")
    if meson_setup and args:
        run_meson_setup(args, build_runs)
    return uid, port


def run_meson_setup(args, build_runs):
    if not shutil.which("meson"):
        print("check_consistency: meson not found; the Dockerfile's meson line was not tried")
        return
    argv = []
    for a in args[1:]:                                  # args[0] is the build directory
        a = re.sub(r"\$\{NVCC_GENCODE\}", _arg_default("NVCC_GENCODE"), a)
        if a.startswith("-Dcuda=") and not shutil.which("nvcc"):
            a = "-Dcuda=auto"
        if a.startswith("--prefix") or "$" in a:
            continue
        argv.append(a)
    with tempfile.TemporaryDirectory(prefix="dsv4d-docker-meson-") as tmp:
        r = subprocess.run(["meson", "setup", os.path.join(tmp, "b")] + argv, cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode:
            bad("Dockerfile: `meson setup " + " ".join(argv) + "` fails on this tree:\n" +
                (r.stdout + r.stderr)[-2000:])
        else:
            print("check_consistency: meson setup " + " ".join(argv) + ": configures")


def _arg_default(name):
    m = re.search(r"^ARG " + name + r"=(.*)$", read("Dockerfile"), re.M)
    v = m.group(1).strip() if m else ""
    if len(v) >= 2 and v[0] == v[-1] == '"':
        v = v[1:-1]
    return v


def check_k8s(flags, uid):
    objs = load_k8s()
    # kustomization lists every top-level manifest
    kpath = os.path.join(K8S, "kustomization.yaml")
    with open(kpath) as f:
        kust = yaml.safe_load(f)
    listed = set(kust.get("resources", []))
    for r in listed:
        if not os.path.exists(os.path.join(K8S, r)):
            bad(f"deploy/k8s/kustomization.yaml: resource {r} does not exist")
    for path in glob.glob(os.path.join(K8S, "*.yaml")):
        b = os.path.basename(path)
        if b != "kustomization.yaml" and b not in listed:
            bad(f"deploy/k8s/kustomization.yaml: {b} is not listed in resources")

    dpath, dep = one(objs, "Deployment")
    cpath, cm = one(objs, "ConfigMap")
    if not dep or not cm:
        return
    data = cm.get("data", {})
    for k, v in data.items():
        check_env(cpath, k, v, flags)
    for need in ("DSV4D_HOST", "DSV4D_PORT", "DSV4D_MODEL", "DSV4D_SHUTDOWN_TIMEOUT"):
        if need not in data:
            bad(f"{cpath}: {need} not set")
    if data.get("DSV4D_HOST") not in ("0.0.0.0", "::"):
        bad(f"{cpath}: DSV4D_HOST {data.get('DSV4D_HOST')!r}: probes and the Service need a "
            f"non-loopback address")
    port = int(data.get("DSV4D_PORT", 8080))
    shutdown = float(data.get("DSV4D_SHUTDOWN_TIMEOUT", 30))

    tpl = dep["spec"]["template"]
    pod = tpl["spec"]
    labels = tpl["metadata"].get("labels", {})
    sel = dep["spec"]["selector"]["matchLabels"]
    if any(labels.get(k) != v for k, v in sel.items()):
        bad(f"{dpath}: selector {sel} does not match the pod labels {labels}")
    ctrs = pod["containers"]
    c = ctrs[0]
    for e in c.get("env", []):
        check_env(f"{dpath} env", e["name"], e.get("value"), flags)
    refs = [x["configMapRef"]["name"] for x in c.get("envFrom", []) if "configMapRef" in x]
    if cm["metadata"]["name"] not in refs:
        bad(f"{dpath}: envFrom does not use the ConfigMap {cm['metadata']['name']}")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if ports.get("http") != port:
        bad(f"{dpath}: container port 'http' {ports.get('http')} != DSV4D_PORT {port}")
    ann = tpl["metadata"].get("annotations", {})
    if "prometheus.io/port" in ann and int(ann["prometheus.io/port"]) != port:
        bad(f"{dpath}: prometheus.io/port {ann['prometheus.io/port']} != DSV4D_PORT {port}")

    routes = read("server/routes.c")
    want = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in want.items():
        p = c.get(probe)
        if not p:
            bad(f"{dpath}: no {probe}")
            continue
        hg = p.get("httpGet", {})
        if hg.get("path") != path:
            bad(f"{dpath}: {probe} on {hg.get('path')}, expected {path}")
        if f'"{path}"' not in routes:
            bad(f"server/routes.c does not serve {path} ({probe})")
        if hg.get("port") not in ("http", port):
            bad(f"{dpath}: {probe} port {hg.get('port')} is not the http port")
    sp = c.get("startupProbe", {})
    budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    if budget < 600:
        bad(f"{dpath}: startupProbe allows {budget} s to load; a large checkpoint needs >= 600")

    pre = c.get("lifecycle", {}).get("preStop", {})
    sleep = 0
    if "exec" in pre:
        cmd = pre["exec"].get("command", [])
        if cmd and cmd[0].endswith("sleep"):
            sleep = float(cmd[1])
    elif "sleep" in pre:
        sleep = float(pre["sleep"]["seconds"])
    if not sleep:
        bad(f"{dpath}: no preStop sleep")
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    need = sleep + shutdown + 5
    if tgps < need:
        bad(f"{dpath}: terminationGracePeriodSeconds {tgps} < preStop {sleep:g} + "
            f"DSV4D_SHUTDOWN_TIMEOUT {shutdown:g} + 5")

    res = c.get("resources", {})
    if "nvidia.com/gpu" not in res.get("limits", {}):
        bad(f"{dpath}: no nvidia.com/gpu limit")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    shm = mounts.get("/dev/shm")
    if not shm or vols.get(shm["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
        bad(f"{dpath}: /dev/shm is not a memory-backed emptyDir")
    model = data.get("DSV4D_MODEL", "")
    mm = [m for p, m in mounts.items() if model.startswith(p.rstrip("/") + "/")]
    if not mm:
        bad(f"{dpath}: DSV4D_MODEL {model} is not under a volume mount")
    else:
        v = vols.get(mm[0]["name"], {})
        if not mm[0].get("readOnly"):
            bad(f"{dpath}: the model volume is not mounted readOnly")
        pvc = v.get("persistentVolumeClaim", {}).get("claimName")
        if pvc:
            names = [o["metadata"]["name"] for _, o in objs.get("PersistentVolumeClaim", [])]
            if pvc not in names:
                bad(f"{dpath}: PVC {pvc} is not defined in deploy/k8s")
        elif "hostPath" not in v:
            bad(f"{dpath}: the model volume is neither a PVC nor a hostPath")
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    if not sc.get("runAsNonRoot"):
        bad(f"{dpath}: runAsNonRoot is not set")
    if uid and str(sc.get("runAsUser", uid)) != uid:
        bad(f"{dpath}: runAsUser {sc.get('runAsUser')} != the Dockerfile's USER {uid}")
    # a Service named X injects X_PORT etc.; dsv4d reads DSV4D_PORT
    svc_path, svc = one(objs, "Service")
    if svc:
        if svc["metadata"]["name"].upper().replace("-", "_") == "DSV4D" and \
                pod.get("enableServiceLinks", True):
            bad(f"{dpath}: enableServiceLinks must be false: the Service dsv4d injects "
                f"DSV4D_PORT=tcp://... which dsv4d reads as its port")
        if any(labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
            bad(f"{svc_path}: selector does not match the pod labels")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ("http", port):
                bad(f"{svc_path}: targetPort {p.get('targetPort')} is not the http port")
    image = c["image"].split("@")[0].rsplit(":", 1)[0]
    if not any(i.get("name") == image for i in kust.get("images", [])):
        bad(f"deploy/k8s/kustomization.yaml: images does not name the container image {image}")

    name = dep["metadata"]["name"]
    for kind in ("PodDisruptionBudget",):
        p, o = one(objs, kind)
        if o and any(labels.get(k) != v for k, v in o["spec"]["selector"]["matchLabels"].items()):
            bad(f"{p}: selector does not match the pod labels")
    p, hpa = one(objs, "HorizontalPodAutoscaler")
    if hpa:
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", name):
            bad(f"{p}: scaleTargetRef {ref} is not the Deployment {name}")
    for p, o in objs.get("ScaledObject", []):
        if o["spec"]["scaleTargetRef"].get("name") != name:
            bad(f"{p}: scaleTargetRef is not the Deployment {name}")
        if not o["spec"].get("triggers"):
            bad(f"{p}: no triggers")
    for p, o in objs.get("PodMonitor", []):
        if any(labels.get(k) != v for k, v in o["spec"]["selector"]["matchLabels"].items()):
            bad(f"{p}: selector does not match the pod labels")
        for ep in o["spec"]["podMetricsEndpoints"]:
            if ep.get("port") not in ports or ep.get("path", "/metrics") != "/metrics":
                bad(f"{p}: endpoint {ep} is not the pod's http port and /metrics")


def main(argv=None):
    global ROOT, K8S
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", help="a built dsv4d, to check the image's runtime packages")
    ap.add_argument("--meson-setup", action="store_true",
                    help="try the Dockerfile's meson setup line on this tree")
    ap.add_argument("--root", default=ROOT, help="the repository (default: this one)")
    a = ap.parse_args(argv)
    ROOT, K8S = a.root, os.path.join(a.root, "deploy", "k8s")
    flags = serve_flags()
    uid, _ = check_dockerfile(flags, a.bin, a.meson_setup)
    check_k8s(flags, uid)
    for p in problems:
        print(p)
    print(f"check_consistency: {len(flags)} serve flags; {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
