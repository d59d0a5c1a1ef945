"""Two gloo processes on the CPU train together: same parameters on both ranks afterwards,
only rank 0 writes, the positive count is averaged over processes; DDP runs without
find_unused_parameters (no preset leaves a parameter without a gradient), so torch's warning
about the flag is gone, and forcing the flag on gives the same weights."""
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str,
            find_unused=None) -> None:
    # what torchrun would set
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from densedet.config import load_config
    from densedet.engine.trainer import Trainer

    cfg = load_config(REPO / "configs" / "yolox_nano.yaml", [
        f"data.root={data}", f"output_dir={out}", "input_size=64", "train.batch_size=4",
        "train.epochs=1", "train.warmup_epochs=0", "train.no_aug_epochs=0", "train.device=cpu",
        "data.num_workers=0", "train.log_interval=1", "data.val_split=null"])
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.find_unused_parameters = find_unused  # None: the trainer's own probe decides
    # torch's DDP warnings come from C++ straight to file descriptor 2: keep them in a file
    err = os.open(Path(result_dir) / f"stderr{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(2)
    os.dup2(err, 2)
    try:
        try:
            trainer.train()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(err)
        ddp_flag = trainer.ddp.find_unused_parameters
        assert trainer.distributed and trainer.world == world and trainer.local_batch == 2
        # the loss normaliser: every process sees the same mean positive count
        local = torch.tensor([float(rank + 1)])
        from densedet.engine.distributed import all_reduce_mean
        mean = all_reduce_mean(local)
        # parameters only: DDP syncs gradients (so parameters), while BatchNorm running
        # statistics are each process's own (rank 0's are broadcast at every forward)
        state = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        torch.save({"state": state, "mean": float(mean), "iters": trainer.global_iter,
                    "find_unused": ddp_flag}, Path(result_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_tiny_dataset(root: Path, n_train: int) -> Path:
    from densedet.data.synth import make_synth

    make_synth(root, images=n_train, size=96, seed=0, workers=1)
    stems = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(s + "\n" for s in stems))
    return root


def _run(tmp_path: Path, data: Path, name: str, find_unused=None) -> tuple[Path, Path]:
    out = tmp_path / name
    results = tmp_path / f"{name}_results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(out), str(results), find_unused),
             nprocs=2, join=True)
    return out, results


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, output_dir, results) of a two-process run with the trainer's own choices."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_tiny_dataset(tmp / "data", n_train=8)
    return (data, *_run(tmp, data, "run"))


def test_two_gloo_processes_stay_in_sync(default_run):
    data, out, results = default_run

    r0 = torch.load(results / "rank0.pt", weights_only=False)
    r1 = torch.load(results / "rank1.pt", weights_only=False)
    # the probe found every parameter used: no extra graph traversal, no warning about it
    assert r0["find_unused"] is False and r1["find_unused"] is False
    for rank in (0, 1):
        assert "find_unused_parameters" not in (results / f"stderr{rank}.txt").read_text()
    # 8 images / (2 per process x 2 processes) = 2 iterations each
    assert r0["iters"] == r1["iters"] == 2
    assert r0["mean"] == r1["mean"] == pytest.approx(1.5)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.allclose(r0["state"][k].float(), r1["state"][k].float(), atol=1e-6), k
    # rank 0 wrote the run's files, with the final (shared) weights
    assert (out / "last.pt").is_file() and (out / "metrics.json").is_file()
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert all(torch.equal(ckpt["model"][k], r0["state"][k]) for k in r0["state"])
    assert not list(out.glob(".*.tmp"))
    # and training moved them away from the (seeded) initial weights
    from densedet.config import load_config
    from densedet.engine.build import build_detector
    from densedet.engine.trainer import seed_everything

    seed_everything(0)
    init = build_detector(load_config(REPO / "configs" / "yolox_nano.yaml"), 10).state_dict()
    moved = [k for k in r0["state"] if not torch.equal(init[k], r0["state"][k])]
    assert len(moved) > len(r0["state"]) // 4


def test_find_unused_parameters_on_changes_nothing_but_speed(default_run, tmp_path):
    """The flag forced on (the old setting): the same weights as the probe's choice (off), and
    torch's warning that it found no unused parameter (which also shows that the test above
    would see that warning)."""
    data, _, off = default_run
    _, on = _run(tmp_path, data, "on", find_unused=True)
    a = torch.load(off / "rank0.pt", weights_only=False)
    b = torch.load(on / "rank0.pt", weights_only=False)
    assert a["find_unused"] is False and b["find_unused"] is True
    assert a["iters"] == b["iters"] == 2
    for k in a["state"]:
        torch.testing.assert_close(b["state"][k], a["state"][k], rtol=0, atol=1e-6, msg=k)
    assert "find_unused_parameters=True was specified" in (on / "stderr0.txt").read_text()
    assert "find_unused_parameters" not in (off / "stderr0.txt").read_text()
