/* test_err.c - the error message buffer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <cmocka.h>

#include "engine/err.h"

static void test_setf_and_prefix(void **state)
{
    (void)state;
    assert_int_equal(err_setf(ERR_FORMAT, "tensor %s: bad", "x"), ERR_FORMAT);
    assert_string_equal(err_msg(), "tensor x: bad");
    assert_int_equal(err_prefix(ERR_FORMAT, "file %d", 3), ERR_FORMAT);
    assert_string_equal(err_msg(), "file 3: tensor x: bad");
    assert_string_equal(err_str(ERR_NOMEM), "out of memory");
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_setf_and_prefix)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
