"""Our DiT <-> diffusers' DiTTransformer2DModel (dit_fast.checkpoint.diffusers), reading it through the
public loader, and the pipeline export (dit_fast.checkpoint.export): CPU, tiny models, fp32."""
import json

import pytest
import torch

from dit_fast.checkpoint import diffusers as fmt
from dit_fast.checkpoint import load_into_model, load_state_dict
from dit_fast.checkpoint.diffusers import DiffusersFormatError
from dit_fast.checkpoint.export import main as export
from dit_fast.models import DiT

diffusers = pytest.importorskip("diffusers")
SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=10)
SMALL_FLAGS = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
               "--image-size", "8", "--vae", "none", "--in-channels", "3", "--num-classes", "10"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed=0, **overrides):
    """A perturbed DiT (adaLN-Zero would output zeros) with the fixed sin-cos pos_embed intact."""
    torch.manual_seed(seed)
    model = DiT(**{**SMALL, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs(model, n=4):
    g = torch.Generator().manual_seed(1)
    side = model.x_embedder.img_size[0]
    x = torch.randn(n, model.in_channels, side, side, generator=g)
    return x, torch.tensor([0, 1, 500, 999])[:n], torch.tensor([0, 3, model.num_classes - 1, model.num_classes])[:n]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _diffusers_copy(model):
    config = {k: v for k, v in fmt.transformer_config(model).items() if not k.startswith("_")}
    theirs = diffusers.DiTTransformer2DModel(**config).eval()
    theirs.load_state_dict(fmt.to_diffusers_state_dict(model.state_dict()), strict=True)
    return theirs


@pytest.mark.parametrize("overrides", [{}, {"learn_sigma": False}, {"num_classes": 1000, "in_channels": 4}],
                         ids=["10-classes", "fixed-sigma", "1000-classes"])
def test_mapping_is_exact_with_the_original_timestep_frequencies(overrides):
    model = _model(**overrides)
    theirs = _diffusers_copy(model)
    x, t, y = _inputs(model)
    with torch.no_grad():
        ours = model(x, t, y)
        stock = theirs(x, timestep=t, class_labels=y).sample
        fmt.use_original_timestep_frequencies(theirs)
        exact = theirs(x, timestep=t, class_labels=y).sample
    assert _rel(exact, ours) <= 1e-5
    # diffusers' own DiT embeds timesteps with 10000^(-i/127), not DiT's 10000^(-i/128). If this
    # starts failing, diffusers fixed it: update diffusers_format's docstring and the README.
    assert _rel(stock, ours) > 1e-3
    assert torch.equal(theirs.pos_embed.pos_embed, model.pos_embed)  # the recomputed table is ours


def test_round_trip_and_per_block_embedders():
    model = _model()
    theirs = fmt.to_diffusers_state_dict(model.state_dict())
    emb = "norm1.emb.timestep_embedder.linear_1.weight"
    assert torch.equal(theirs[f"transformer_blocks.0.{emb}"], theirs[f"transformer_blocks.1.{emb}"])
    back = fmt.from_diffusers_state_dict(theirs)
    assert set(back) == set(model.state_dict()) - {"pos_embed"}
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items() if k != "pos_embed")
    theirs[f"transformer_blocks.1.{emb}"] = theirs[f"transformer_blocks.1.{emb}"] + 1e-3
    with pytest.raises(DiffusersFormatError, match=r"transformer_blocks\.1\..*differs from block 0"):
        fmt.from_diffusers_state_dict(theirs)


def test_what_diffusers_cannot_hold_is_refused():
    with pytest.raises(DiffusersFormatError, match="square only"):
        fmt.transformer_config(_model(input_size=(8, 4)))
    with pytest.raises(DiffusersFormatError, match="null-class row"):
        fmt.transformer_config(_model(class_dropout_prob=0.0))


def _ckpt(tmp_path, model=None, name="ema.pt"):
    path = tmp_path / name
    torch.save((model or _model()).state_dict(), path)
    return path


def test_export_folder_loads_in_diffusers_and_imports_back(tmp_path, capsys):
    model = _model()
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
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert _rel(theirs(x, timestep=t, class_labels=y).sample, model(x, t, y)) <= 1e-5
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
    bad = _model()
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
    from dit_fast.sampling import Sampler
    from dit_fast.vae import load_vae
    from tests.vae_helpers import save_tiny_vae

    vae_dir = save_tiny_vae(tmp_path / "vae")
    model = _model(num_classes=1000, in_channels=4, hidden_size=32, num_heads=2)
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
    sampler = Sampler(model, create_diffusion("3"), sampler="dpm-solver++", cfg_scale=2.0, num_classes=1000,
                      guide_all_channels=True)
    ours = (load_vae(str(vae_dir)).decode(sampler.sample(z, torch.tensor(labels))) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, ours, rtol=1e-4, atol=1e-5)


def test_export_without_a_cached_hub_vae_still_writes_the_transformer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network in tests; a hub id in no cache
    model = _model(in_channels=4)
    flags = [*SMALL_FLAGS[:8], "--image-size", "64", "--vae", "dit-fast-tests/no-such-vae",
             "--num-classes", "10"]
    out = tmp_path / "export"
    export(["--ckpt", str(_ckpt(tmp_path, model)), "--out", str(out), *flags])
    assert "no vae/ written" in capsys.readouterr().out and not (out / "vae").exists()
    assert json.loads((out / "model_index.json").read_text())["vae"] == [None, None]
