"""A peer that dies or hangs mid-run: the other rank stops with an error naming the collective,
within the job's collective timeout, instead of waiting forever (or torch's 30 minutes).

The ranks are started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR in the environment), so
the Trainer creates the process group and its timeout itself. Plain processes, not mp.spawn:
spawn would terminate the survivor as soon as the other rank died.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal

import pytest

from tests.tests_support import free_port

TIMEOUT_S = 5.0


def _rank(rank: int, port: int, cfg, run_dir: str, sig: int, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    from recsys_moe.trainer import Trainer

    try:
        trainer = Trainer(cfg, run_dir)
        step = trainer.train_step

        def dying_step(batch):
            if rank == 1 and trainer.step == 3:
                os.kill(os.getpid(), sig)
            return step(batch)

        trainer.train_step = dying_step
        trainer.train()
        results.put((rank, "finished", ""))
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        results.put((rank, type(e).__name__, str(e)))
    results.close()
    results.join_thread()  # flushed before the hard exit below
    os._exit(0)  # no teardown: the peer is gone


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_dead_or_hung_peer_stops_the_other_rank(tiny_train_config, tmp_path, sig):
    cfg = tiny_train_config
    cfg.trainer.collective_timeout_s = TIMEOUT_S
    cfg.trainer.max_steps = 10
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, port, cfg, str(tmp_path), sig, results))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        # start-up takes a while on a loaded machine; the wait after the failure is the timeout
        rank, kind, message = results.get(timeout=240)
    except queue.Empty:
        pytest.fail("the surviving rank neither finished nor raised within 240 s")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    assert rank == 0 and kind == "CollectiveError", (rank, kind, message)
    assert "rank 0/2" in message and "collective" in message
    assert "trainer.collective_timeout_s (5 s)" in message
    assert "step 4" in message  # the step rank 1 never joined
    assert any(phase in message for phase in ("forward", "backward", "all-reduce")), message
