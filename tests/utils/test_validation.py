"""`utils.validation`: a wrong type is a `TypeError`, a right-typed value out of range a `ValueError`; both name the
field."""

import math
import subprocess
import sys

import numpy as np
import pytest

from transformers_spring.utils.validation import check_bool, check_choice, check_float, check_int


def test_check_int():
    assert check_int(3, "k", minimum=1) == 3
    assert type(check_int(np.int64(3), "k")) is int  # numpy ints come back as Python ints (JSON-serialisable)
    assert check_int(None, "k", optional=True) is None
    with pytest.raises(ValueError, match=r"^`top_k` must be an int >= 1, got 0\.$"):
        check_int(0, "top_k", minimum=1)
    with pytest.raises(ValueError, match=r"`n` must be an int in \[1, 4\]"):
        check_int(5, "n", minimum=1, maximum=4)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match="`k`"):
            check_int(bad, "k", minimum=1)


def test_check_float():
    assert check_float(1, "w") == 1.0 and isinstance(check_float(1, "w"), float)
    assert check_float(None, "w", optional=True) is None
    assert check_float(math.inf, "w", finite=False) == math.inf
    with pytest.raises(ValueError, match=r"`w` must be a finite float in \(0, 1\], got 0\.0\."):
        check_float(0.0, "w", minimum=0.0, maximum=1.0, min_inclusive=False)
    with pytest.raises(ValueError, match=r"`w` must be a finite float < 1"):
        check_float(1.0, "w", maximum=1.0, max_inclusive=False)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="`w`"):
            check_float(bad, "w")
    with pytest.raises(ValueError, match="`w`"):  # NaN fails a bound even when non-finite values are allowed
        check_float(math.nan, "w", minimum=0.0, finite=False)
    for bad in (False, "0.5", None, [0.5]):
        with pytest.raises(TypeError, match="`w`"):
            check_float(bad, "w")


def test_check_bool_and_choice():
    assert check_bool(np.bool_(True), "b") is True and check_bool(None, "b", optional=True) is None
    for bad in ("false", 0, 1, None):
        with pytest.raises(TypeError, match="`b`"):
            check_bool(bad, "b")
    assert check_choice("a", "mode", ("a", "b")) == "a" and check_choice(None, "dtype", (None, "x")) is None
    with pytest.raises(ValueError, match=r"`mode` must be one of \('a', 'b'\), got 'c'\."):
        check_choice("c", "mode", ("a", "b"))
    with pytest.raises(TypeError, match="`mode`"):
        check_choice(3, "mode", ("a", "b"))


def test_imports_only_the_standard_library():
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('v', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "assert not {'numpy', 'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    import transformers_spring.utils.validation as validation

    subprocess.run([sys.executable, "-c", code, validation.__file__], check=True)
