import logging
import os
import sys
import uuid
import warnings

# Read at import time by huggingface_hub and transformers: set before anything imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformers_spring.memory import HashingEncoder, LoGoMemory  # noqa: E402

# Frames a deprecation passes through between the code that used a deprecated name and its report: the warnings and
# logging modules, transformers' deprecation decorators and output properties, torch's module call, this file.
_REPORTING_FRAMES = (
    os.path.join("transformers", "utils", "deprecation.py"),
    os.path.join("transformers", "utils", "generic.py"),
    os.path.join("transformers", "utils", "logging.py"),
    os.path.join("torch", "nn", "modules", "module.py"),
    os.sep + "warnings.py",
    os.path.join("logging", "__init__.py"),
    os.sep + "functools.py",
    __file__,
)


def _deprecated_by_us() -> str | None:
    """The module that used the deprecated name, when it is one of ours: the first frame outside the reporting
    machinery."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith(_REPORTING_FRAMES):
        frame = frame.f_back
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return module if module.startswith("transformers_spring") else None


@pytest.fixture(autouse=True)
def no_deprecations_from_our_code(monkeypatch):
    """Fails a test when a `transformers_spring` frame uses a deprecated transformers / peft name, by a
    `FutureWarning` / `DeprecationWarning` or by a deprecation log line (transformers 5.24 logs the
    `outputs.past_key_values` deprecation). setup.cfg's `filterwarnings` turns warnings attributed to our modules into
    errors too. Deprecations that peft or transformers raise themselves stay allowed."""
    real_warn, real_warning = warnings.warn, logging.Logger.warning

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        if isinstance(category, type) and issubclass(category, (FutureWarning, DeprecationWarning)):
            module = _deprecated_by_us()
            if module is not None:
                raise AssertionError(f"{module} uses a deprecated API: {message}")
        return real_warn(message, category, stacklevel + 1, source, **kwargs)

    def warning(self, msg, *args, **kwargs):
        if "deprecat" in str(msg).lower():
            module = _deprecated_by_us()
            if module is not None:
                raise AssertionError(f"{module} uses a deprecated API: {msg}")
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1  # records keep their caller's location
        return real_warning(self, msg, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    monkeypatch.setattr(logging.Logger, "warning", warning)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes each forward
    ~100x slower; restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def encoder():
    return HashingEncoder(64)


@pytest.fixture(scope="session")
def milvus_lite_uri(tmp_path_factory):
    """One Milvus Lite file for the session (each memory gets its own collections in it). Skipped without the
    `milvus` extra, unless `SPRING_REQUIRE_MILVUS=1` (CI sets it): then a missing extra fails the tests."""
    if os.environ.get("SPRING_REQUIRE_MILVUS") == "1":
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    else:
        pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
        pytest.importorskip("milvus_lite", reason="the milvus extra is not installed")
    return str(tmp_path_factory.mktemp("milvus") / "memory.db")


@pytest.fixture
def backend(request):
    """The memory backend a test runs on: `None` (in-process, the default) or, under
    `@pytest.mark.parametrize("backend", testing_utils.BACKENDS, indirect=True)`, a factory of Milvus Lite
    backends, one pair of collections per memory, dropped after the test: Milvus answers the searches
    (`"milvus"`), or the in-process mirror does (`"milvus-process"`)."""
    kind = getattr(request, "param", "default")
    if kind == "default":
        yield None
        return
    from transformers_spring.memory import MilvusBackend

    uri, made = request.getfixturevalue("milvus_lite_uri"), []
    request.getfixturevalue("monkeypatch").setenv("SPRING_MILVUS_URI", uri)  # where a load connects: the caller says

    def make():
        searches = "process" if kind == "milvus-process" else "milvus"
        made.append(MilvusBackend(uri, collection=f"t{uuid.uuid4().hex[:16]}", num_buckets=4, searches=searches))
        return made[-1]

    yield make
    for store in made:
        store.drop()
        store.close()


@pytest.fixture
def make_memory(encoder, backend):
    def make(**kwargs):
        kwargs.setdefault("gate", None)
        kwargs.setdefault("num_threads", 1)
        if backend is not None:
            kwargs.setdefault("backend", backend())
            kwargs.setdefault("exact_below", 0)  # global searches take the ANN path (Milvus or hnswlib)
        return LoGoMemory(kwargs.pop("encoder", encoder), **kwargs)

    return make
