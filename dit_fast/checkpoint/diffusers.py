"""Our DiT state dict <-> diffusers' DiTTransformer2DModel layout (the hub's facebook/DiT-XL-2-256):
the name mapping, reading a diffusers transformer, its config. The pipeline export that writes
this layout is dit_fast.checkpoint.export.

The two layouts hold the same numbers under other names and shapes:

    ours                                   diffusers (per block i)
    x_embedder.proj                        pos_embed.proj
    pos_embed (frozen parameter)           -- (recomputed sin-cos buffer, not saved)
    t_embedder.mlp.{0,2}                   transformer_blocks.i.norm1.emb.timestep_embedder.linear_{1,2}
    y_embedder.embedding_table             transformer_blocks.i.norm1.emb.class_embedder.embedding_table
    blocks.i.attn.qkv (3D, D)              transformer_blocks.i.attn1.to_{q,k,v} (D, D) each
    blocks.i.attn.proj                     transformer_blocks.i.attn1.to_out.0
    blocks.i.mlp.fc{1,2}                   transformer_blocks.i.ff.net.{0.proj,2}
    blocks.i.adaLN_modulation.1            transformer_blocks.i.norm1.linear
    final_layer.adaLN_modulation.1         proj_out_1
    final_layer.linear                     proj_out_2

diffusers gives EVERY block its own timestep/class embedder (the final layer uses block 0's), where
DiT has one: export replicates ours into each block; import requires the copies to be equal (a
model whose per-block embedders diverged, e.g. fine-tuned in diffusers, is not a DiT) and takes
block 0's.

Numbers: with the same weights diffusers' model is NOT exactly the original DiT. Its timestep
embedding (``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``, fixed in
CombinedTimestepLabelEmbeddings) uses frequencies 10000^(-i/127) where DiT uses 10000^(-i/128), so
outputs differ by a few percent; ``use_original_timestep_frequencies`` sets the shift to 0 on a
loaded diffusers model, after which it matches ours to fp32 round-off. Its last LayerNorm's eps
comes from the config (``norm_eps``, default 1e-5; DiT uses 1e-6): export writes 1e-6.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .safe_io import read_safetensors, safe_torch_load

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers' legacy class name: the hub's facebook/DiT-XL-2-256 still says Transformer2DModel.
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_EMB = "norm1.emb."
_PER_BLOCK_EMBEDDERS = {  # ours -> the name inside each diffusers block
    "t_embedder.mlp.0": _EMB + "timestep_embedder.linear_1",
    "t_embedder.mlp.2": _EMB + "timestep_embedder.linear_2",
    "y_embedder.embedding_table": _EMB + "class_embedder.embedding_table",
}
_BLOCK_LINEARS = {  # ours (inside blocks.i) -> diffusers (inside transformer_blocks.i)
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_TOP_LINEARS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}


class DiffusersFormatError(ValueError):
    """A state dict or config that the DiT <-> diffusers mapping cannot represent."""


def _depth_of(state: Mapping, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise DiffusersFormatError(f"the {prefix}N blocks are not numbered 0..N-1: {sorted(ids)[:8]}")
    return len(ids)


def _params(names: Mapping[str, str]):
    for ours, theirs in names.items():
        for leaf in ("weight", "bias"):
            yield f"{ours}.{leaf}", f"{theirs}.{leaf}"


def _renamed(depth: int):
    """(our key, diffusers key) of every tensor that only changes its name (both directions use it)."""
    yield from _params(_TOP_LINEARS)
    for i in range(depth):
        for ours, theirs in _params(_BLOCK_LINEARS):
            yield f"blocks.{i}.{ours}", f"transformer_blocks.{i}.{theirs}"


def to_diffusers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our DiT state dict (original names) -> DiTTransformer2DModel's state dict.

    The frozen ``pos_embed`` is dropped (diffusers recomputes the same sin-cos table); the one
    timestep/class embedder is copied into every block. Raises DiffusersFormatError on a key the
    mapping does not know (nothing is silently left behind).
    """
    depth = _depth_of(state, "blocks.")
    out: dict[str, torch.Tensor] = {}
    used = {"pos_embed"}
    for ours, theirs in _renamed(depth):
        out[theirs] = state[ours]
        used.add(ours)
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):  # qkv rows are [q; k; v] (Attention reshapes to (3, H, d))
            q, k, v = state[f"{src}attn.qkv.{leaf}"].chunk(3, dim=0)
            for name, part in zip("qkv", (q, k, v)):
                out[f"{dst}attn1.to_{name}.{leaf}"] = part.clone()
            used.add(f"{src}attn.qkv.{leaf}")
        for ours, theirs in _PER_BLOCK_EMBEDDERS.items():
            for leaf in ("weight",) if "embedding_table" in ours else ("weight", "bias"):
                out[f"{dst}{theirs}.{leaf}"] = state[f"{ours}.{leaf}"].clone()
                used.add(f"{ours}.{leaf}")
    unknown = sorted(set(state) - used)
    if unknown:
        raise DiffusersFormatError(f"keys the diffusers layout has no place for: {unknown[:8]}")
    return out


def from_diffusers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel's state dict -> ours, without ``pos_embed`` (a fixed sin-cos table that
    the diffusers layout does not store; ``fit_to_model`` adds the model's own).

    Raises DiffusersFormatError when the per-block embedders differ (naming the block and tensor)
    or a key is unknown.
    """
    depth = _depth_of(state, "transformer_blocks.")
    if depth == 0:
        raise DiffusersFormatError("no transformer_blocks.* keys: not a diffusers DiT transformer")
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ours, theirs in _renamed(depth):
        out[ours] = state[theirs]
        used.add(theirs)
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            parts = [state[f"{src}attn1.to_{n}.{leaf}"] for n in "qkv"]
            out[f"{dst}attn.qkv.{leaf}"] = torch.cat(parts, dim=0)
            used.update(f"{src}attn1.to_{n}.{leaf}" for n in "qkv")
        for ours, theirs in _PER_BLOCK_EMBEDDERS.items():
            for leaf in ("weight",) if "embedding_table" in ours else ("weight", "bias"):
                key = f"{src}{theirs}.{leaf}"
                first = state[f"transformer_blocks.0.{theirs}.{leaf}"]
                if not torch.equal(state[key], first):
                    raise DiffusersFormatError(
                        f"{key} differs from block 0's: this diffusers model has per-block timestep/"
                        f"class embedders, which DiT (one shared embedder) cannot represent")
                out[f"{ours}.{leaf}"] = first
                used.add(key)
    unknown = sorted(set(state) - used)
    if unknown:
        raise DiffusersFormatError(f"keys the DiT layout has no place for: {unknown[:8]}")
    return out


def transformer_config(model) -> dict:
    """The DiTTransformer2DModel config of our ``model`` (a dit_fast DiT).

    Raises DiffusersFormatError for what diffusers' DiT cannot hold: a non-square input (it
    builds a square model from ``sample_size``) or a model without the null class row.
    """
    h, w = model.x_embedder.img_size
    if h != w:
        raise DiffusersFormatError(
            f"diffusers' DiTTransformer2DModel is square only (sample_size); this model's input is {h}x{w}")
    table = model.y_embedder.embedding_table.weight
    if table.shape[0] != model.num_classes + 1:
        raise DiffusersFormatError(
            "diffusers' DiT always has a null-class row (class dropout); this model was built with "
            "class_dropout_prob=0 and has none")
    hidden = model.pos_embed.shape[-1]
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": model.num_heads,
        "attention_head_dim": hidden // model.num_heads,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "num_layers": len(model.blocks),
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": h,
        "patch_size": model.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": model.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # DiT's LayerNorms; diffusers' default 1e-5 would change the last norm
    }


def check_config_fits(config: Mapping, model, source="the diffusers config") -> None:
    """Raise DiffusersFormatError naming every config field that does not fit ``model``."""
    if config.get("_class_name", TRANSFORMER_CLASSES[0]) not in TRANSFORMER_CLASSES:
        raise DiffusersFormatError(f"{source} is a {config['_class_name']}, not a DiT transformer "
                                   f"({' or '.join(TRANSFORMER_CLASSES)})")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise DiffusersFormatError(f"{source}: norm_type {config['norm_type']!r} is not DiT's ada_norm_zero")
    want = transformer_config(model)
    flags = {"num_attention_heads": "--num-heads/--model", "attention_head_dim": "--hidden-size/--num-heads",
             "in_channels": "--in-channels/--vae", "out_channels": "learn-sigma (2 x in_channels)",
             "num_layers": "--depth/--model", "sample_size": "--image-size (// VAE downsampling)",
             "patch_size": "--model (DiT-*/p)", "num_embeds_ada_norm": "--num-classes"}
    defaults = {"out_channels": config.get("in_channels")}  # diffusers: None means in_channels
    bad = []
    for field, flag in flags.items():
        have = config.get(field, defaults.get(field))
        if have is not None and have != want[field]:
            bad.append(f"{field}={have} (the model built from {flag} has {want[field]})")
    if config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        bad.append(f"activation_fn={config['activation_fn']!r} (DiT uses gelu-approximate)")
    if bad:
        raise DiffusersFormatError(f"{source} does not fit the model: " + "; ".join(bad))


def find_transformer_dir(path) -> Path | None:
    """The diffusers transformer folder at ``path`` (or its ``transformer/`` subfolder), else None."""
    path = Path(path).expanduser()
    for folder in (path, path / "transformer"):
        if (folder / CONFIG_NAME).is_file() and any((folder / n).is_file() for n in WEIGHTS_NAMES):
            return folder
    return None


def read_transformer_dir(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict in diffusers layout) of a diffusers transformer folder.

    Weights come from diffusion_pytorch_model.safetensors, else the .bin through torch.load with
    weights_only (never unpickling arbitrary objects).
    """
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    weights = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but none of {', '.join(WEIGHTS_NAMES)}")
    state = read_safetensors(weights) if weights.suffix == ".safetensors" else safe_torch_load(weights)
    return config, state


class DiffusersStateDict(dict):
    """Weights read from a diffusers DiT, already in our layout but without ``pos_embed``.

    ``config`` is the transformer's config.json (None for a bare .safetensors file); ``source``
    names where it came from. ``fit_to_model`` checks the config and completes the dict.
    """

    def __init__(self, state: Mapping, config: dict | None, source: str):
        super().__init__(state)
        self.config = config
        self.source = source


def is_diffusers_checkpoint(path) -> bool:
    """A diffusers transformer (or pipeline) folder, or a .safetensors file in diffusers' DiT layout."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        return find_transformer_dir(path) is not None
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("transformer_blocks.") for k in f.keys())
    except Exception:  # not a readable safetensors file: the ordinary loader reports it
        return False


def read_diffusers_weights(path) -> DiffusersStateDict:
    """The weights at ``path`` (see is_diffusers_checkpoint) converted to our layout."""
    folder = find_transformer_dir(path)
    if folder is not None:
        config, state = read_transformer_dir(folder)
        source = str(folder / CONFIG_NAME)
    else:
        config, state, source = None, read_safetensors(path), str(path)
    return DiffusersStateDict(from_diffusers_state_dict(state), config, source)


def fit_to_model(state: DiffusersStateDict, model) -> dict[str, torch.Tensor]:
    """Check the diffusers config against ``model`` (the error names the field) and add the
    model's own fixed sin-cos ``pos_embed``, which is the table diffusers computes."""
    if state.config is not None:
        check_config_fits(state.config, model, source=state.source)
    return {**state, "pos_embed": model.pos_embed.detach().clone()}


def use_original_timestep_frequencies(transformer) -> None:
    """Make a loaded diffusers DiT embed timesteps exactly as the original DiT (10000^(-i/128)).

    diffusers' DiT uses ``downscale_freq_shift=1`` (10000^(-i/127)); setting it to 0 on every
    block's Timesteps module makes the diffusers model compute the original DiT's function.
    """
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
