"""Two gloo ranks in-process (torch.multiprocessing): an error on rank 0 before a broadcast reaches
rank 1 as the same kind of error (nobody waits in the broadcast), and a collective that a peer
never joins fails within the timeout naming that peer."""
import os
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dit_fast.distributed import free_port


def _worker(rank: int, port: int, results):
    import torch
    from dit_fast.distributed import CollectiveTimeout, broadcast_from_rank0, guarded_collective
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from datetime import timedelta
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=4))

    def create():
        raise NotADirectoryError("--results-dir 'x' is a file, not a directory")
    try:
        broadcast_from_rank0(create, rank)
        results.put((rank, "broadcast", "no error"))
    except NotADirectoryError as err:
        results.put((rank, "broadcast", str(err)))
    assert broadcast_from_rank0(lambda: "run-dir", rank) == "run-dir"
    if rank == 1:
        time.sleep(8)  # stuck: never reaches the all-reduce of step 5 in time
    start = time.monotonic()
    try:
        guarded_collective(lambda: dist.all_reduce(torch.zeros(1)), "the loss all-reduce", 5, 4)
        results.put((rank, "timeout", "no error"))
    except CollectiveTimeout as err:
        results.put((rank, "timeout", f"{err} after {time.monotonic() - start:.0f} s"))


@pytest.mark.slow
def test_rank0_error_reaches_every_rank_and_a_stuck_peer_is_named():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(3):
        rank, what, text = results.get(timeout=120)
        got[(rank, what)] = text
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert got[(0, "broadcast")] == "--results-dir 'x' is a file, not a directory"
    assert got[(1, "broadcast")] == "(on rank 0) --results-dir 'x' is a file, not a directory"
    text = got[(0, "timeout")]
    assert "step 5: the loss all-reduce on rank 0 did not complete within --collective-timeout 4 s: " \
           "rank(s) [1] never reached it" in text, text
