#!/usr/bin/env python3
"""Build the shipped onnxqat demo assets: a small float ONNX CNN for Fashion-MNIST
plus small real data files.

Outputs (written next to this script unless ``--out-dir`` is given):

* ``fmnist_dsconv.onnx``  float32 classifier, input ``image`` float32
  ``[batch, 1, 28, 28]`` (pixels / 255, no other normalisation), output ``probs``
  float32 ``[batch, 10]`` (softmax probabilities). Opset 17, IR version 8,
  BatchNormalization kept as separate nodes (not folded into Conv).
* ``fmnist_calib.npz``    512 training images for calibration.
* ``fmnist_train.npz``    8000 training images for fine-tuning / QAT demos.
* ``fmnist_test.npz``     the full t10k test set (10000 images).

Every npz holds ``image`` (float32 ``[N, 1, 28, 28]``, values x/255) and
``label`` (int64 ``[N]``).

Data
----
Fashion-MNIST (Zalando SE, MIT/Expat licence) as shipped by the Debian package
``dataset-fashion-mnist``, which installs the idx ``.gz`` files under
``/usr/share/datasets/fashion-mnist``::

    apt-get install dataset-fashion-mnist
    # or, without installing it system-wide:
    mkdir -p /tmp/fm && cd /tmp/fm && apt-get download dataset-fashion-mnist \
        && dpkg -x dataset-fashion-mnist_*.deb x
    # -> /tmp/fm/x/usr/share/datasets/fashion-mnist

How to run
----------
Needs a separate venv with PyTorch (CPU) 2.13.0, numpy and onnx 1.16/1.17 (no
torchvision)::

    python3 -m venv /tmp/demo_torchvenv
    /tmp/demo_torchvenv/bin/pip install torch==2.13.0 numpy "onnx>=1.16,<1.18"
    /tmp/demo_torchvenv/bin/python models/make_demo.py \
        [--data-dir /usr/share/datasets/fashion-mnist] \
        [--ort-python /path/to/venv-with-onnxruntime/bin/python]

The ONNX Runtime check runs in-process when ``onnxruntime`` is importable, else
in a subprocess with the interpreter given by ``--ort-python`` (or the
``ONNXQAT_ORT_PYTHON`` environment variable); without either it is skipped.
Training (6 epochs on 60k images, ~45 s per epoch) takes about 5 minutes on
2 otherwise idle CPU cores.

Export notes
------------
The legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is
used; it still exists in torch 2.13 (with a DeprecationWarning). It is called
with ``do_constant_folding=False`` because constant folding folds each
BatchNormalization into the preceding Conv, and onnxqat wants to do that
folding itself. The exporter also de-duplicates initializers with identical
values and re-creates the duplicates via ``Identity`` nodes; the script turns
such ``Identity(initializer)`` nodes back into plain initializers, so that
every weight is a graph initializer and no initializer is shared.

Importing this module does not train anything: a benchmark can use
``FashionDSNet``, ``build_model``, ``load_idx_dataset``, ``load_npz`` etc.
"""
from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
# Tried in this order when --data-dir is not given.
FALLBACK_DATA_DIRS = (
    DEFAULT_DATA_DIR,
    "/tmp/fm/x/usr/share/datasets/fashion-mnist",
)
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
OPSET = 17

N_CALIB = 512
N_TRAIN_SUBSET = 8000
N_TEST = 10000
FILE_BUDGET = 15 * 1024 * 1024        # every file < 15 MB
TOTAL_BUDGET = 30 * 1024 * 1024       # models/ together < 30 MB


# --------------------------------------------------------------------------- data
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzip-compressed) idx file into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
             0x0D: ">f4", 0x0E: ">f8"}[raw[2]]
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    return data.reshape(shape)


def find_data_dir(data_dir: str | None = None) -> Path:
    """Return the directory holding the Fashion-MNIST idx .gz files."""
    candidates = [data_dir] if data_dir else list(FALLBACK_DATA_DIRS)
    for c in candidates:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").exists():
            return Path(c)
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found in {candidates}; install the Debian "
        "package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
        "or pass --data-dir")


def load_idx_dataset(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load split 'train' (60000) or 't10k' (10000) as raw uint8 images [N,28,28] and int64 labels [N]."""
    d = find_data_dir(data_dir)
    images = read_idx(d / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(d / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    assert images.shape[0] == labels.shape[0] and images.shape[1:] == (28, 28)
    return images, labels


def to_model_input(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28] in [0,1] (x/255), the model's input format."""
    return (images_u8.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a shipped npz: (image float32 [N,1,28,28], label int64 [N])."""
    with np.load(path) as z:
        return z["image"], z["label"]


def save_npz(path: Path, images_u8: np.ndarray, labels: np.ndarray) -> int:
    np.savez_compressed(path, image=to_model_input(images_u8), label=labels.astype(np.int64))
    return path.stat().st_size


# -------------------------------------------------------------------------- model
class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, optionally followed by ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class DSBlock(nn.Module):
    """Depthwise-separable residual block.

    dw Conv3x3 (groups=cin, stride) + BN + ReLU -> pw Conv1x1 + BN, plus a shortcut
    (identity when shapes match, else Conv1x1(stride) + BN), then Add and ReLU.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.dw = ConvBN(cin, cin, 3, stride=stride, groups=cin, relu=True)
        self.pw = ConvBN(cin, cout, 1, relu=False)
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = ConvBN(cin, cout, 1, stride=stride, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.pw(self.dw(x)) + self.shortcut(x))


class FashionDSNet(nn.Module):
    """Small depthwise-separable residual CNN for 28x28 grey images, 10 classes.

    stem Conv3x3(1->32)+BN+ReLU, 28x28
    block 32->32            28x28  (identity shortcut)
    block 32->64, stride 2  14x14  (1x1 conv+BN shortcut)
    block 64->64            14x14
    block 64->128, stride 2  7x7
    block 128->128           7x7
    block 128->128           7x7
    GlobalAveragePool, Flatten, Linear(128->10), Softmax.

    ``forward`` returns softmax probabilities (what is exported); train on
    ``logits``.
    """

    def __init__(self, num_classes: int = 10,
                 widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128, 128),
                 strides: tuple[int, ...] = (1, 2, 1, 2, 1, 1)):
        super().__init__()
        self.stem = ConvBN(1, widths[0], 3, relu=True)
        self.blocks = nn.Sequential(*[
            DSBlock(widths[i], widths[i + 1], strides[i]) for i in range(len(strides))])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)
        self.softmax = nn.Softmax(dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.logits(x))


def build_model(num_classes: int = 10) -> FashionDSNet:
    return FashionDSNet(num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------- training
def set_determinism(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def train(model: FashionDSNet, x_train: np.ndarray, y_train: np.ndarray, *, epochs: int,
          batch_size: int, lr: float, seed: int, log=print) -> None:
    """AdamW + OneCycle, light augmentation (random horizontal flip, +-2 px shift).

    Trains in channels_last memory format (about 2.5x faster for the depthwise
    convs on CPU than NCHW); the model is returned in the default format.
    """
    g = torch.Generator().manual_seed(seed)
    model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(to_model_input(x_train))
    y = torch.from_numpy(y_train)
    n = x.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    for ep in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=g)
        tot_loss, tot_correct = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            # augmentation: flip half the batch, shift the whole batch by up to 2 px
            flip = torch.rand(xb.shape[0], generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = F.pad(xb, (2, 2, 2, 2))[:, :, 2 + dy:30 + dy, 2 + dx:30 + dx]
            out = model.logits(xb.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(out, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * xb.shape[0]
            tot_correct += (out.argmax(1) == yb).sum().item()
        log(f"epoch {ep + 1}/{epochs}: loss {tot_loss / n:.4f} train-acc {100 * tot_correct / n:.2f}% "
            f"({time.time() - t0:.0f}s)")
    model.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def predict_torch(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Softmax probabilities for float32 images [N,1,28,28]."""
    model.eval()
    outs = [model(torch.from_numpy(images[i:i + batch_size])).numpy()
            for i in range(0, images.shape[0], batch_size)]
    return np.concatenate(outs)


# ------------------------------------------------------------------------- export
def _materialize_identity_initializers(model_proto) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The TorchScript exporter de-duplicates initializers that have identical
    values (e.g. BN weight == running_var == 1 in a fresh model) and re-creates
    the other names via Identity nodes. onnxqat wants one initializer per
    parameter, so undo that. Returns the (source, copy) name pairs.
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {i.name: i for i in graph.initializer}
    keep, removed = [], []
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(arr.copy(), name=node.output[0]))
            removed.append((node.input[0], node.output[0]))
        else:
            keep.append(node)
    if removed:
        del graph.node[:]
        graph.node.extend(keep)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        still = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(still)
    return removed


def export_onnx(model: FashionDSNet, path: Path, log=print) -> None:
    """Export in eval mode with BatchNormalization kept as separate nodes."""
    import warnings

    import onnx

    model.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path),
            dynamo=False,                      # legacy TorchScript exporter
            export_params=True,
            keep_initializers_as_inputs=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,         # True would fold BN into Conv
        )
    mp = onnx.load(str(path))
    n_id = _materialize_identity_initializers(mp)
    if n_id:
        log(f"replaced {len(n_id)} Identity(initializer) nodes by plain initializers: "
            + ", ".join(f"{b} (was Identity of {a})" for a, b in n_id))
    mp.producer_name = "onnxqat models/make_demo.py (torch %s)" % torch.__version__.split("+")[0]
    mp.doc_string = ("FashionDSNet: Fashion-MNIST classifier, input 'image' float32 [batch,1,28,28] "
                     "(pixels/255), output 'probs' float32 [batch,10] softmax. Classes: "
                     + ", ".join(CLASS_NAMES))
    onnx.checker.check_model(mp, full_check=True)
    onnx.save(mp, str(path))

    # sanity checks on what the onnxqat tool relies on
    n_bn_modules = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    ops = [n.op_type for n in mp.graph.node]
    assert ops.count("BatchNormalization") == n_bn_modules, "BN nodes were fused/lost"
    assert "Identity" not in ops and "Constant" not in ops, ops
    assert 13 <= mp.opset_import[0].version <= 17 and mp.ir_version <= 10
    dims = [d.dim_param or d.dim_value for d in mp.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 28, 28], dims


def ort_evaluate(model_path, npz_path, batch_size=500):
    """Run the ONNX model with onnxruntime on a shipped npz.

    Self-contained (numpy + onnxruntime only) so it can also run in another
    interpreter via ``--ort-python``. Returns accuracy (%), predictions and
    the ORT version.
    """
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    with np.load(npz_path) as z:
        x, y = z["image"], z["label"]
    probs = np.concatenate([sess.run(["probs"], {"image": x[i:i + batch_size]})[0]
                            for i in range(0, x.shape[0], batch_size)])
    pred = probs.argmax(1)
    return {"accuracy": float(100.0 * (pred == y).mean()), "pred": pred.tolist(),
            "probs_sum_max_err": float(np.abs(probs.sum(1) - 1).max()),
            "ort_version": ort.__version__}


def run_ort_check(model_path: Path, npz_path: Path, ort_python: str | None):
    try:
        import onnxruntime  # noqa: F401
        return ort_evaluate(model_path, npz_path)
    except ImportError:
        pass
    if not ort_python:
        return None
    code = inspect.getsource(ort_evaluate) + (
        "\nimport json, sys\nprint(json.dumps(ort_evaluate(sys.argv[1], sys.argv[2])))\n")
    out = subprocess.run([ort_python, "-c", code, str(model_path), str(npz_path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None,
                    help=f"dir with the idx .gz files (default {DEFAULT_DATA_DIR}, "
                         "falling back to /tmp/fm/x/usr/share/datasets/fashion-mnist)")
    ap.add_argument("--out-dir", default=str(here))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ort-python", default=os.environ.get("ONNXQAT_ORT_PYTHON"),
                    help="python with onnxruntime, used if onnxruntime is not importable here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    set_determinism(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    data_dir = find_data_dir(args.data_dir)
    print(f"data: {data_dir}")
    x_tr, y_tr = load_idx_dataset("train", str(data_dir))
    x_te, y_te = load_idx_dataset("t10k", str(data_dir))

    # ---- data files (deterministic selection; calib and train subset are disjoint)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(x_tr.shape[0])
    calib_idx = np.sort(perm[:N_CALIB])
    sub_idx = np.sort(perm[N_CALIB:N_CALIB + N_TRAIN_SUBSET])
    n_test = N_TEST
    sizes = {"fmnist_calib.npz": save_npz(out / "fmnist_calib.npz", x_tr[calib_idx], y_tr[calib_idx]),
             "fmnist_train.npz": save_npz(out / "fmnist_train.npz", x_tr[sub_idx], y_tr[sub_idx])}
    while True:  # shrink the test set only if it does not fit the budget
        te_idx = np.arange(x_te.shape[0]) if n_test >= x_te.shape[0] else \
            np.sort(np.random.default_rng(args.seed).permutation(x_te.shape[0])[:n_test])
        sizes["fmnist_test.npz"] = save_npz(out / "fmnist_test.npz", x_te[te_idx], y_te[te_idx])
        if sizes["fmnist_test.npz"] < FILE_BUDGET and sum(sizes.values()) < TOTAL_BUDGET - 1024 * 1024:
            break
        n_test -= 1000
    counts = {"fmnist_calib.npz": len(calib_idx), "fmnist_train.npz": len(sub_idx),
              "fmnist_test.npz": len(te_idx)}

    # ---- model
    model = build_model()
    print(f"params: {count_params(model)}")
    train(model, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    x_test_f, y_test = load_npz(out / "fmnist_test.npz")
    torch_probs = predict_torch(model, x_test_f)
    torch_pred = torch_probs.argmax(1)
    torch_acc = 100.0 * float((torch_pred == y_test).mean())
    full_acc = 100.0 * float((predict_torch(model, to_model_input(x_te)).argmax(1) == y_te).mean())
    print(f"torch test accuracy: {torch_acc:.2f}% on shipped test npz ({len(y_test)}), "
          f"{full_acc:.2f}% on full t10k")

    onnx_path = out / "fmnist_dsconv.onnx"
    export_onnx(model, onnx_path)
    sizes["fmnist_dsconv.onnx"] = onnx_path.stat().st_size

    res = run_ort_check(onnx_path, out / "fmnist_test.npz", args.ort_python)
    if res is None:
        print("onnxruntime not available (pass --ort-python); ORT check skipped")
    else:
        agree = int((np.asarray(res["pred"]) == torch_pred).sum())
        print(f"onnxruntime {res['ort_version']} test accuracy: {res['accuracy']:.2f}% "
              f"(argmax agrees with torch on {agree}/{len(torch_pred)})")
        if abs(res["accuracy"] - torch_acc) > 0.1:
            print("ERROR: ONNX and torch accuracy differ by more than 0.1 points", file=sys.stderr)
            return 1

    print("counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    total = 0
    for name in sorted(sizes):
        sz = (out / name).stat().st_size
        total += sz
        print(f"  {name:22s} {sz / 1e6:7.3f} MB ({sz} bytes)")
    print(f"  {'total':22s} {total / 1e6:7.3f} MB; elapsed {time.time() - t_start:.0f}s")
    assert all(s < FILE_BUDGET for s in sizes.values()) and total < TOTAL_BUDGET
    return 0


if __name__ == "__main__":
    sys.exit(main())
