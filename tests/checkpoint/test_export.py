"""The diffusers DiTPipeline export (dit_fast.checkpoint.export; export_diffusers.py is its script) and
reading the export back through the public loader. CPU, tiny models, fp32."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_fast.checkpoint import diffusers as fmt
from dit_fast.checkpoint import load_into_model, load_state_dict
from dit_fast.checkpoint.diffusers import DiffusersFormatError
from dit_fast.checkpoint.export import main as export
from dit_fast.models import DiT
from tests.checkpoint.tiny_weights import SMALL, dit_inputs, perturbed_dit, rel_error

diffusers = pytest.importorskip("diffusers")
SMALL_FLAGS = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
               "--image-size", "8", "--vae", "none", "--in-channels", "3", "--num-classes", "10"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ckpt(tmp_path, model=None, name="ema.pt"):
    path = tmp_path / name
    torch.save((model or perturbed_dit()).state_dict(), path)
    return path


def test_export_folder_loads_in_diffusers_and_imports_back(tmp_path, capsys):
    model = perturbed_dit()
    out = tmp_path / "export"
    result = export(["--ckpt", str(_ckpt(tmp_path, model)), "--out", str(out), *SMALL_FLAGS])
    assert result["check"]["exact"] <= 1e-5 and "relative error" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(str(out / "scheduler"))
    assert len(scheduler.betas) == 1000 and scheduler.config.timestep_spacing == "trailing"

    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(out / "transformer")).eval()
    fmt.use_original_timestep_frequencies(theirs)
    fresh = DiT(**SMALL).eval()
    load_into_model(fresh, load_state_dict(out))              # the pipeline folder finds transformer/
    x, t, y = dit_inputs(model)
    with torch.no_grad():
        assert rel_error(theirs(x, timestep=t, class_labels=y).sample, model(x, t, y)) <= 1e-5
        assert torch.equal(fresh(x, t, y), model(x, t, y))   # strict load: the same numbers
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / "ours.safetensors"))
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    assert all(map(fmt.is_diffusers_checkpoint, (out, out / "transformer", weights)))
    assert not any(map(fmt.is_diffusers_checkpoint, (tmp_path / "ema.pt", tmp_path / "ours.safetensors")))
    bare = DiT(**SMALL).eval()                                 # a bare .safetensors in the hub layout
    load_into_model(bare, load_state_dict(weights))
    assert all(torch.equal(a, b) for a, b in zip(bare.state_dict().values(), model.state_dict().values()))


def test_import_refuses_a_config_that_does_not_fit(tmp_path):
    out = tmp_path / "export"
    export(["--ckpt", str(_ckpt(tmp_path)), "--out", str(out), "--no-check", *SMALL_FLAGS])
    with pytest.raises(DiffusersFormatError, match="num_embeds_ada_norm=10 .*--num-classes has 12"):
        load_into_model(DiT(**{**SMALL, "num_classes": 12}), load_state_dict(out / "transformer"))
    with pytest.raises(DiffusersFormatError, match="num_attention_heads=4 .*--num-heads/--model has 2"):
        load_into_model(DiT(**{**SMALL, "num_heads": 2}), load_state_dict(out / "transformer"))


def test_export_is_atomic_and_errors_are_clear(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(["--ckpt", str(_ckpt(tmp_path)), "--out", str(out), *SMALL_FLAGS])
    bad = perturbed_dit()
    with torch.no_grad():
        bad.pos_embed.add_(0.5)  # not the fixed table diffusers would recompute
    with pytest.raises(DiffusersFormatError, match="pos_embed"):
        export(["--ckpt", str(_ckpt(tmp_path, bad, "bad.pt")), "--out", str(out), "--overwrite", *SMALL_FLAGS])
    assert [p.name for p in out.iterdir()] == ["keep.txt"], "a failed export must not touch --out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "ema.pt", "export"]
    with pytest.raises(ValueError, match="2 names for --num-classes 10"):
        names = tmp_path / "names.txt"
        names.write_text("zero\none\n")
        export(["--ckpt", str(tmp_path / "ema.pt"), "--out", str(out), "--overwrite",
                "--class-names", str(names), *SMALL_FLAGS])


def test_dit_pipeline_runs_the_export_and_matches_our_sampler(tmp_path):
    """A 1000-class square latent model with a tiny VAE: DiTPipeline.from_pretrained(DIR) runs,
    and with the original timestep frequencies it gives our DPM-Solver++ samples."""
    from dit_fast.diffusion import create_diffusion
    from dit_fast.sampling import build_sampler
    from dit_fast.vae import load_vae
    from tests.vae_helpers import save_tiny_vae

    vae_dir = save_tiny_vae(tmp_path / "vae")
    model = perturbed_dit(num_classes=1000, in_channels=4, hidden_size=32, num_heads=2)
    flags = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
             "--image-size", "16", "--vae", str(vae_dir), "--num-classes", "1000"]
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(1000)))
    out = tmp_path / "pipe"
    export(["--ckpt", str(_ckpt(tmp_path, model)), "--out", str(out), "--class-names", str(names), *flags])
    assert json.loads((out / "model_index.json").read_text())["id2label"]["7"] == "class 7"

    pipe = diffusers.DiTPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids(["class 7"]) == [7]
    fmt.use_original_timestep_frequencies(pipe.transformer)
    labels = [7, 123]
    images = pipe(class_labels=labels, num_inference_steps=3, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16)

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # DiTPipeline's x_T
    # DiTPipeline guides all latent channels (not the original's first three).
    sampler = build_sampler(model, create_diffusion("3"), method="dpm-solver++", cfg_scale=2.0, num_classes=1000,
                      guide_all_channels=True)
    ours = (load_vae(str(vae_dir)).decode(sampler.sample(z, torch.tensor(labels))) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, ours, rtol=1e-4, atol=1e-5)


def test_export_without_a_cached_hub_vae_still_writes_the_transformer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network in tests; a hub id in no cache
    model = perturbed_dit(in_channels=4)
    flags = [*SMALL_FLAGS[:8], "--image-size", "64", "--vae", "dit-fast-tests/no-such-vae",
             "--num-classes", "10"]
    out = tmp_path / "export"
    export(["--ckpt", str(_ckpt(tmp_path, model)), "--out", str(out), *flags])
    assert "no vae/ written" in capsys.readouterr().out and not (out / "vae").exists()
    assert json.loads((out / "model_index.json").read_text())["vae"] == [None, None]


@pytest.mark.parametrize("entry", [["export_diffusers.py"], ["-m", "dit_fast.export_diffusers"]])
def test_script_and_module_shim_fail_with_one_line(tmp_path, entry):
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}:{repo / 'kernels'}"}
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    proc = subprocess.run([sys.executable, *entry, "--ckpt", str(junk), "--out", str(tmp_path / "out"),
                           *SMALL_FLAGS], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("export_diffusers.py: error: ") and "not a torch checkpoint" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]
