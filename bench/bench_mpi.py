"""Data-parallel QAT over MPI: epoch time at 1 and 2 ranks, and the all-reduce cost per step.

    .venv/bin/python bench/bench_mpi.py [--samples 4096] [--global-batch 64] [--cores 2] [--json OUT]

Trains the shipped demo model (models/fmnist_dsconv.onnx, W8A8, cross-entropy, AdamW) for two
epochs on ``--samples`` training images at one global batch size, once as one process with
``--cores`` onnxruntime threads and once under ``mpirun -n 2`` with ``cores / 2`` threads per rank
(the same cores either way, and the same optimizer steps: rank r takes its half of every global
batch). The second epoch's time is reported (the first includes nothing else, but warms caches).

Then ``mpirun -n 2`` times ``MPI_Allreduce`` (sum, in place, float32) of the demo model's gradient
buffer and of a ResNet-50-sized one (25.6M parameters), as :class:`onnxqat.distributed.GradientSync`
does every step, between two ranks on this machine (shared memory: no network). The estimate for N
machines on a network follows from the bytes (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_DIR, load_average, machine_lines  # noqa: E402

RESNET50_PARAMS = 25_557_032  # torchvision resnet50: trainable parameters


def _mpi_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _mpirun(n: int, argv: list[str]) -> list[str]:
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    extra = ["--oversubscribe", "--bind-to", "none"] if "Open MPI" in version else []
    return [mpirun, *extra, "-n", str(n), *argv]


def child_train(out: str, samples: int, global_batch: int, threads: int) -> None:
    import warnings

    import numpy as np

    from onnxqat import QuantizationSimModel, distributed
    from onnxqat.data import NpzBatches

    warnings.simplefilter("ignore")
    w = distributed.world()
    models = os.path.join(REPO_DIR, "models")
    with np.load(os.path.join(models, "fmnist_train.npz")) as f:
        train = {k: f[k][:samples] for k in ("image", "label")}
    with np.load(os.path.join(models, "fmnist_calib.npz")) as f:
        calib = {"image": f["image"][:256]}
    sim = QuantizationSimModel(os.path.join(models, "fmnist_dsconv.onnx"))
    sim.compute_encodings(NpzBatches(calib, 64), progress=False)
    batches = NpzBatches(train, global_batch, shuffle=True, seed=0, drop_last=True)
    per_rank = distributed.RankRows(batches) if w.size > 1 else batches
    cpu: list[float] = []
    with sim.trainer(loss="cross_entropy", lr=1e-4, threads=threads) as trainer:
        start = time.perf_counter()
        for epoch in (1, 2):  # CPU seconds of this process per epoch (all its threads)
            begin = time.process_time()
            trainer.fit(per_rank, epochs=epoch, progress=False)
            cpu.append(time.process_time() - begin)
        total = time.perf_counter() - start
        grads = sum(int(np.asarray(v).size) for v in trainer.trained_parameters().values())
    if w.size > 1:  # CPU seconds of all ranks together
        cpu = [float(x) for x in w.comm.allreduce(np.asarray(cpu))]
    if w.root:
        with open(out, "w") as f:
            json.dump({"ranks": w.size, "threads": threads, "epoch_s": [h.seconds for h in trainer.history], "cpu_s": cpu,
                       "steps": trainer.history[-1].steps, "fit_s": total, "trainable": grads,
                       "loss": trainer.history[-1].loss}, f)


def child_allreduce(out: str, sizes: list[int], reps: int) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    found = {}
    for n in sizes:
        buf = np.ones(n, dtype=np.float32)
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)  # warm-up
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(reps):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        comm.Barrier()
        found[str(n)] = (time.perf_counter() - start) / reps
    if comm.Get_rank() == 0:
        with open(out, "w") as f:
            json.dump(found, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, out, *rest = args.child
        if kind == "train":
            child_train(out, int(rest[0]), int(rest[1]), int(rest[2]))
        else:
            child_allreduce(out, [int(x) for x in rest[1:]], int(rest[0]))
        return
    me = [sys.executable, os.path.abspath(__file__)]
    machine = machine_lines()  # the date is the start's
    results: dict = {"runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2):
            threads = max(1, args.cores // ranks)
            out = os.path.join(tmp, f"train{ranks}.json")
            argv = [*me, "--child", "train", out, str(args.samples), str(args.global_batch), str(threads)]
            before = load_average()
            subprocess.run(_mpirun(ranks, argv) if ranks > 1 else argv, check=True, env=_mpi_env(threads),
                           cwd=REPO_DIR)
            with open(out) as f:
                run = json.load(f)
            run["load"] = [before, load_average()]
            results["runs"].append(run)
            print(f"[mpi] {ranks} rank(s) x {threads} thread(s): epochs {run['epoch_s']} s (load {before} -> "
                  f"{run['load'][1]})", file=sys.stderr, flush=True)
        trainable = results["runs"][0]["trainable"]
        sizes = [trainable + 4, RESNET50_PARAMS + 4]
        out = os.path.join(tmp, "allreduce.json")
        before = load_average()
        subprocess.run(_mpirun(2, [*me, "--child", "allreduce", out, "20", *map(str, sizes)]), check=True,
                       env=_mpi_env(1), cwd=REPO_DIR)
        with open(out) as f:
            results["allreduce_s"] = json.load(f)
        results["allreduce_load"] = [before, load_average()]
    print("\n".join(machine))
    print(f"\ndemo model, {args.samples} samples, global batch {args.global_batch}, W8A8, 2 epochs\n")
    print("| ranks x threads | steps/epoch | epoch 1 (s) | epoch 2 (s) | speed-up (epoch 2) | CPU s, epoch 2, all ranks "
          "| load (start / end) |")
    print("| :-- | ---: | ---: | ---: | ---: | ---: | :-- |")
    base = results["runs"][0]["epoch_s"][-1]
    for r in results["runs"]:
        e = r["epoch_s"]
        print(f"| {r['ranks']} x {r['threads']} | {r['steps']} | {e[0]:.2f} | {e[1]:.2f} | {base / e[1]:.2f}x | "
              f"{r['cpu_s'][1]:.1f} | {r['load'][0]} / {r['load'][1]} |")
    print(f"\nall-reduce between 2 ranks on this machine (load {results['allreduce_load'][0]} -> "
          f"{results['allreduce_load'][1]}):\n")
    print("| buffer | parameters | bytes | seconds per all-reduce |")
    print("| :-- | ---: | ---: | ---: |")
    for name, n in (("demo model", sizes[0]), ("ResNet-50 size", sizes[1])):
        print(f"| {name} | {n - 4:,} | {4 * n:,} | {results['allreduce_s'][str(n)]:.5f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
