"""dit_fast.distributed: the launcher's environment, and a world of one that joins no group."""
import torch.distributed as dist

from dit_fast.distributed import env_world, free_port, init_distributed


def test_env_world_reads_the_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (5, 8, 1)


def test_plain_python_is_a_world_of_one_without_a_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    already = dist.is_initialized()  # an in-process DeepSpeed test may have left a world of one
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.device.type, ctx.initialized_here) == (0, 1, "cpu", False)
    assert dist.is_initialized() == already
    ctx.barrier()  # no-ops in a world of one
    ctx.close()
    assert 0 < free_port() < 65536


def test_a_failed_run_leaves_a_joined_group_with_its_code_and_its_buffered_output(tmp_path):
    """exit_leaving_group skips the interpreter's teardown beside gloo's threads (which now and then
    aborts with -6) yet keeps the code and what was printed (piped stdout is block-buffered, and
    os._exit alone would drop it); with no group it is sys.exit."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "leave.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        "from dit_fast.distributed import exit_leaving_group, free_port\n"
        "if sys.argv[1] == 'group':\n"
        "    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
        "    dist.all_reduce(__import__('torch').ones(1))\n"
        "print('printed before the exit', end='')\n"
        "exit_leaving_group(3)\n"
        "print('never')\n")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered
    for mode in ("group", "none"):
        proc = subprocess.run([sys.executable, str(script), mode], cwd=root, capture_output=True,
                              text=True, timeout=120, env=env)
        assert (proc.returncode, proc.stdout) == (3, "printed before the exit"), (mode, proc.stderr[-2000:])
