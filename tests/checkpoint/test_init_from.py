"""train.py --init-from: a trained 10-class DiT on 8x8 digits starts a 3-class run on 16x16 digits
(plain python, one CPU rank, fp32). Its first loss is far below a from-scratch run's on the same data,
the log names every tensor not loaded, the new run is step 0 with the source in its config; a shape
that cannot carry over is one line, exit 2, nothing created. The planning itself (label rows, null
row, pos_embed, what is refused) is checked in-process on tiny models."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_fast.checkpoint import CheckpointError, atomic_save
from dit_fast.checkpoint.init_from import LABEL_TABLE, apply_init_from, plan_init_from
from dit_fast.models import DiT

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4", "--vae", "none",
        "--num-workers", "0", "--precision", "fp32", "--log-every", "1", "--global-batch-size", "32"]
SMALL = dict(patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(*args, check=True):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DIT_FAST_FAULT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train.py", *TINY, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def first_loss(run: Path) -> float:
    return float(re.search(r"\(step=0000001\) Train Loss: ([0-9.]+)", (run / "log.txt").read_text()).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(source run dir, 3-class 16x16 features): the source trained 300 steps on 10-class 8x8 digits."""
    from dit_fast.data import digits_dataset, write_digits_features
    from dit_fast.data.latents import write_latent_dataset
    base = tmp_path_factory.mktemp("init_from")
    train("--features-path", write_digits_features(base / "feat8", 8), "--image-size", 8, "--num-classes", 10,
          "--results-dir", base / "source", "--max-steps", 300, "--ckpt-every", 300, "--lr", "1e-3",
          "--ema-decay", "0.9")  # a 300-step EMA at 0.9999 would still be the initialisation
    images, labels = digits_dataset(16)
    keep = labels < 3
    three = write_latent_dataset(base / "feat16-3", np.stack([images[keep]] * 2, axis=1), labels[keep],
                                 class_names=["0", "1", "2"], image_size=16, flips="duplicate")
    return next((base / "source").iterdir()), three, base


def test_fine_tune_another_class_count_and_image_size(runs):
    source, three, base = runs
    new = ["--features-path", three, "--image-size", 16, "--num-classes", 3, "--max-steps", 1]
    train(*new, "--results-dir", base / "scratch")
    train(*new, "--results-dir", base / "tuned", "--init-from", source, "--keep-labels", "--ckpt-every", 1)
    scratch, tuned = (next((base / d).iterdir()) for d in ("scratch", "tuned"))
    assert first_loss(tuned) < 0.5 * first_loss(scratch), (first_loss(tuned), first_loss(scratch))
    log = (tuned / "log.txt").read_text()
    assert "--init-from: pos_embed: not loaded; the fixed sin-cos table of this model's 8x8 patch grid" in log
    assert (f"--init-from: {LABEL_TABLE}: rebuilt for 3 classes (the checkpoint has 10): rows of classes "
            "0..2 kept, the null row carried over") in log
    assert "(step=0000001)" in log  # a new run: step 0 -> 1, not the source's 300
    saved = json.loads((tuned / "config.json").read_text())["train"]
    assert saved["init_from"] == str(source) and saved["keep_labels"] is True
    # The EMA started from the source's weights too (not the random init): after one Adam step of
    # lr 1e-4 at decay 0.9999 it is within 1e-7 of them, and the random init is orders away.
    from dit_fast.checkpoint import load_state_dict
    was, ema = load_state_dict(source), load_state_dict(tuned)
    for name in ("blocks.1.attn.qkv.weight", "final_layer.linear.weight", "t_embedder.mlp.0.weight"):
        torch.testing.assert_close(ema[name], was[name], rtol=0, atol=1e-7, msg=name)
    torch.testing.assert_close(ema[LABEL_TABLE][:3], was[LABEL_TABLE][:3], rtol=0, atol=1e-7)


def test_a_shape_that_cannot_carry_over_is_one_line_and_nothing_is_created(runs):
    source, three, base = runs
    proc = train("--features-path", three, "--image-size", 16, "--num-classes", 3, "--max-steps", 1,
                 "--results-dir", base / "wide", "--init-from", source, "--hidden-size", 128, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("train.py: error: --init-from") and \
        "x_embedder.proj.weight is (64, 1, 2, 2) in the checkpoint but (128, 1, 2, 2) in this model" in line
    assert not (base / "wide").exists()


def _tiny(seed, **kw):
    torch.manual_seed(seed)
    model = DiT(**{**SMALL, "input_size": 8, "num_classes": 10, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # adaLN-Zero starts at zero: make every tensor informative
    return model


def test_plan_rows_pos_embed_and_everything_else(tmp_path):
    old = _tiny(0)
    atomic_save({"ema": old.state_dict()}, tmp_path / "ema.pt")
    new = _tiny(1, input_size=16, num_classes=3)
    before = new.state_dict()
    notes = []
    apply_init_from(new, tmp_path / "ema.pt", keep_labels=False, log=notes.append)
    after = new.state_dict()
    table = after[LABEL_TABLE]
    assert torch.equal(table[3], old.state_dict()[LABEL_TABLE][10])  # the null row, to the new null index
    assert torch.equal(table[:3], before[LABEL_TABLE][:3])             # without --keep-labels: re-initialised
    assert torch.equal(after["pos_embed"], before["pos_embed"])        # the 16x16 model's own table
    same = [k for k in after if k not in ("pos_embed", LABEL_TABLE)]
    assert same and all(torch.equal(after[k], old.state_dict()[k]) for k in same)
    assert len(notes) == 2 and all(n.startswith("--init-from: ") for n in notes)

    kept = _tiny(2, num_classes=12)
    plan = apply_init_from(kept, tmp_path / "ema.pt", keep_labels=True, log=lambda _: None)
    assert plan.label_rows == [(i, i) for i in range(10)] + [(12, 10)]
    assert torch.equal(kept.y_embedder.embedding_table.weight[:10], old.y_embedder.embedding_table.weight[:10])


@pytest.mark.parametrize("change, tensor", [
    ({"patch_size": 4}, "x_embedder.proj.weight"),
    ({"in_channels": 3}, "x_embedder.proj.weight"),
    ({"depth": 3}, "blocks.2."),
    ({"learn_sigma": False}, "final_layer.linear.weight"),
])
def test_what_cannot_carry_over_names_the_tensor(tmp_path, change, tensor):
    atomic_save(_tiny(0).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=re.escape(tensor)):
        plan_init_from(tmp_path / "w.pt", DiT(**{**SMALL, "input_size": 8, "num_classes": 10, **change}), 10)


def test_a_diffusers_folder_is_a_source(tmp_path):
    """The hub layout (config.json + diffusion_pytorch_model.safetensors) fine-tunes like our own files;
    its config may name other classes and sizes (the shapes decide, tensor by tensor)."""
    from safetensors.torch import save_file

    from dit_fast.checkpoint import diffusers as fmt
    old = _tiny(0)
    folder = tmp_path / "hub" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(fmt.transformer_config(old)))
    save_file(fmt.to_diffusers_state_dict(old.state_dict()), str(folder / "diffusion_pytorch_model.safetensors"))
    new = _tiny(1, input_size=16, num_classes=3)
    apply_init_from(new, tmp_path / "hub", keep_labels=True, log=lambda _: None)
    assert torch.equal(new.blocks[1].attn.qkv.weight, old.blocks[1].attn.qkv.weight)
    assert torch.equal(new.y_embedder.embedding_table.weight[[0, 1, 2, 3]],
                       old.y_embedder.embedding_table.weight[[0, 1, 2, 10]])


def test_a_sit_training_file_is_a_source(tmp_path):
    """SiT's train.py file ({"model", "ema", "opt", "args"}: an argparse.Namespace, read without
    unpickling it) fine-tunes from its EMA, like our own."""
    import argparse
    old = _tiny(0)
    zeros = {k: torch.zeros_like(v) for k, v in old.state_dict().items()}
    torch.save({"model": zeros, "ema": old.state_dict(), "opt": {}, "args": argparse.Namespace(model="SiT-S/2")},
               tmp_path / "0400000.pt")
    new = _tiny(1, num_classes=3)
    apply_init_from(new, tmp_path / "0400000.pt", keep_labels=True, log=lambda _: None)
    assert torch.equal(new.blocks[0].adaLN_modulation[1].weight, old.blocks[0].adaLN_modulation[1].weight)
    assert torch.equal(new.y_embedder.embedding_table.weight, old.y_embedder.embedding_table.weight[[0, 1, 2, 10]])


def _saved_step(tmp_path, model, num_classes):
    """A complete checkpoint directory as train.py writes it (EMA file + train_state.pt's config)."""
    step = tmp_path / "run" / "checkpoints" / "step-0000005"
    step.mkdir(parents=True)
    atomic_save({"ema": model.state_dict()}, step / "ema-0000005.pt")
    atomic_save({"config": {"model": {"num_classes": num_classes}}, "train_steps": 5}, step / "train_state.pt")
    return step


def test_a_source_without_a_null_row_is_read_from_its_saved_config(tmp_path):
    """A run trained with class dropout off has num_classes rows, no null row: its last class must
    not become the new null label; same rows, other meaning (11 classes -> 10 + null) too."""
    old = _tiny(0, num_classes=11, class_dropout_prob=0.0)
    step = _saved_step(tmp_path, old, 11)
    assert old.y_embedder.embedding_table.weight.shape[0] == 11
    new = _tiny(1, num_classes=10)  # 11 rows: 10 classes and the null label
    fresh_null = new.y_embedder.embedding_table.weight[10].clone()
    notes = []
    plan = apply_init_from(new, step, keep_labels=True, log=notes.append)
    assert plan.label_rows == [(i, i) for i in range(10)]
    table = new.y_embedder.embedding_table.weight
    assert torch.equal(table[:10], old.y_embedder.embedding_table.weight[:10])
    assert torch.equal(table[10], fresh_null)  # not class 10's vector
    assert any("the null row newly initialised (the checkpoint has none" in n for n in notes), notes

    # The same weights as a bare file say nothing of their classes: the last row is taken for the
    # null label, and the log says it was assumed.
    atomic_save(old.state_dict(), tmp_path / "bare.pt")
    notes = []
    plan = apply_init_from(_tiny(1, num_classes=3), tmp_path / "bare.pt", log=notes.append)
    assert plan.label_rows == [(3, 10)]
    assert any("the null row carried over (assumed to be the checkpoint's last row)" in n for n in notes), notes


def test_a_saved_config_that_contradicts_the_label_table_is_refused(tmp_path):
    step = _saved_step(tmp_path, _tiny(0), 7)  # 11 rows, but the config says 7 classes
    with pytest.raises(CheckpointError, match=r"has 11 rows, but the checkpoint's config says 7 classes"):
        plan_init_from(step, _tiny(1, num_classes=3), 3)
