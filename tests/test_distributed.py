"""Two gloo processes on the CPU train together: same parameters on both ranks afterwards,
only rank 0 writes, the positive count is averaged over processes."""
import os
import socket
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


def _worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str) -> None:
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
    try:
        trainer.train()
        assert trainer.distributed and trainer.world == world and trainer.local_batch == 2
        # the loss normaliser: every process sees the same mean positive count
        local = torch.tensor([float(rank + 1)])
        from densedet.engine.distributed import all_reduce_mean
        mean = all_reduce_mean(local)
        # parameters only: DDP syncs gradients (so parameters), while BatchNorm running
        # statistics are each process's own (rank 0's are broadcast at every forward)
        state = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        torch.save({"state": state, "mean": float(mean), "iters": trainer.global_iter},
                   Path(result_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_tiny_dataset(root: Path, n_train: int) -> Path:
    from densedet.data.synth import make_synth

    make_synth(root, images=n_train, size=96, seed=0, workers=1)
    stems = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(s + "\n" for s in stems))
    return root


def test_two_gloo_processes_stay_in_sync(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_train=8)
    out = tmp_path / "run"
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(out), str(results)), nprocs=2, join=True)

    r0 = torch.load(results / "rank0.pt", weights_only=False)
    r1 = torch.load(results / "rank1.pt", weights_only=False)
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
