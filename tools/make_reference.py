"""Write the reference tensors of tests/reference/ from the ORIGINAL DiT code (issue #10).

    python tools/make_reference.py --dit /tmp/DiT

--dit is a local copy of facebookresearch/DiT at commit ed81ce2 (nothing is vendored or downloaded), e.g.

    mkdir -p /tmp/DiT && git --git-dir=/work/.mirror/facebookresearch+DiT/repo archive ed81ce2 | tar -x -C /tmp/DiT

The script checks the SHA-256 of the original files it runs against their ed81ce2 contents, imports the
original ``models.py`` and ``diffusion/`` from that path, and writes (fp32, CPU, fixed seeds):

  tests/reference/models.pt     per model config: the constructor kwargs and seed, the state_dict right
                                after ``torch.manual_seed(seed); DiT(**kwargs)``, the perturbed weights
                                (seeded noise added to every tensor: adaLN-Zero makes a fresh DiT output
                                zeros), inputs and the outputs of forward (eval, and train with a seeded
                                label drop) and forward_with_cfg (doubled batch: conditional half, null half).
  tests/reference/diffusion.pt  per create_diffusion config, run with a perturbed model above: timestep_map,
                                q_sample, training_losses, p_mean_variance, and (respaced configs) seeded
                                DDPM p_sample_loop and DDIM ddim_sample_loop, with the noise given and drawn.

Both are plain dicts of tensors, str, int, float and bool, readable with torch.load(weights_only=True);
each holds a "meta" dict (DiT commit, torch version, date, timm stand-in).

What stands in for timm, and why: the original models.py imports PatchEmbed, Attention and Mlp from
``timm.models.vision_transformer``. timm is not installed here, and pip's timm imports torchvision, which
does not exist beside this CPU torch. So before importing the original, this script puts a small module of
its own under that name (``_TIMM_STANDIN`` below): PatchEmbed, Attention and Mlp with timm 0.6's
constructor signatures, submodule creation order (which fixes the RNG draws of default initialisation)
and parameter names (proj; qkv, proj; fc1, fc2), and timm 0.6's math (fp32, no fused attention):
softmax((q @ k^T) * scale) @ v. It was checked once against real timm 0.6.13 (installed with --no-deps
into a throwaway directory, torchvision stubbed): identical state_dict under the same seed and identical
DiT outputs. timm >= 0.9 uses F.scaled_dot_product_attention on torch 2, which differs by rounding only.
"""
import argparse
import datetime
import hashlib
import importlib
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

DIT_COMMIT = "ed81ce2"
# SHA-256 of the original files this script runs, at DIT_COMMIT.
DIT_SHA256 = {
    "models.py": "1b8031a1340a3d1045c0bdb382334068f5f20e32edf67b3e6aba961ba91846ca",
    "diffusion/__init__.py": "0128da38ee27ab91b78458809f9c50d188d7377b60cc73d3ee777bca8029425d",
    "diffusion/diffusion_utils.py": "4bc929a713a1136bd96b5d88605f41707bf484fbabe448b0407764eb21502add",
    "diffusion/gaussian_diffusion.py": "d7d095d98ff4666e565d0a854790992e24cc09a4ac75e8eaae9a4ee186a8887b",
    "diffusion/respace.py": "9dde1492dd9d03e47caa12c7a7293dd7a5af1a79f3ddb0629f1692d97c856903",
}
_TIMM_STANDIN = "tools/make_reference.py stand-in for timm.models.vision_transformer (timm 0.6 math attention)"
OUT = Path(__file__).resolve().parent.parent / "tests" / "reference"

# Model configs: small, and different in every argument the architecture depends on.
MODEL_CONFIGS = {
    "p2_sigma": dict(seed=0, kwargs=dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                          num_heads=4, num_classes=10, learn_sigma=True)),
    "p4_nosigma": dict(seed=1, kwargs=dict(input_size=8, patch_size=4, in_channels=4, hidden_size=24, depth=1,
                                            num_heads=3, num_classes=7, learn_sigma=False, mlp_ratio=2.0,
                                            class_dropout_prob=0.25)),
    "p2_nodrop": dict(seed=2, kwargs=dict(input_size=4, patch_size=2, in_channels=3, hidden_size=16, depth=2,
                                           num_heads=2, num_classes=5, learn_sigma=True, class_dropout_prob=0.0)),
}
CFG_SCALE = 4.0

# Diffusion configs: (create_diffusion kwargs, model config). Respaced ones also run the sampling loops.
DIFFUSION_CONFIGS = {
    "linear_learned_full": (dict(timestep_respacing=""), "p2_sigma"),
    "linear_learned_rescaled_25": (dict(timestep_respacing="25", rescale_learned_sigmas=True), "p2_sigma"),
    "cosine_kl_full": (dict(timestep_respacing="", noise_schedule="squaredcos_cap_v2", use_kl=True), "p2_sigma"),
    "cosine_learned_ddim10": (dict(timestep_respacing="ddim10", noise_schedule="squaredcos_cap_v2"), "p2_sigma"),
    "linear_fixedlarge_25": (dict(timestep_respacing="25", learn_sigma=False), "p4_nosigma"),
    "linear_fixedsmall_xstart_ddim10": (dict(timestep_respacing="ddim10", learn_sigma=False, sigma_small=True,
                                             predict_xstart=True), "p4_nosigma"),
    "steps50_sections_10_5": (dict(timestep_respacing="10,5", diffusion_steps=50), "p2_sigma"),
}
CFG_LOOP_CONFIGS = {"linear_learned_rescaled_25", "cosine_learned_ddim10"}  # sampled via forward_with_cfg


# --------------------------------------------------------------------------------------------------------
# The stand-in for timm.models.vision_transformer (see the module docstring).
# --------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                 bias=True):
        super().__init__()
        as_pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        self.img_size, self.patch_size = as_pair(img_size), as_pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        x = self.proj(x)                           # (N, D, H/p, W/p)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)       # (N, T, D)
        return self.norm(x)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                    # each (N, H, T, D/H)
        weights = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(N, T, D)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, bias=True,
                 drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def install_timm_standin():
    vit = types.ModuleType("timm.models.vision_transformer")
    vit.PatchEmbed, vit.Attention, vit.Mlp = PatchEmbed, Attention, Mlp
    vit.__doc__ = _TIMM_STANDIN
    timm, timm_models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, timm_models.vision_transformer = timm_models, vit
    sys.modules.update({"timm": timm, "timm.models": timm_models, "timm.models.vision_transformer": vit})


def import_original(dit):
    """The original DiT class and create_diffusion, from the checkout at `dit` (hashes checked)."""
    dit = Path(dit).resolve()
    for name, digest in DIT_SHA256.items():
        got = hashlib.sha256((dit / name).read_bytes()).hexdigest()
        if got != digest:
            sys.exit(f"{dit / name} is not the file of DiT commit {DIT_COMMIT} (sha256 {got})")
    install_timm_standin()
    sys.path.insert(0, str(dit))
    models, diffusion = importlib.import_module("models"), importlib.import_module("diffusion")
    assert Path(models.__file__).resolve().parent == dit, models.__file__
    return models.DiT, diffusion.create_diffusion


# --------------------------------------------------------------------------------------------------------
# Reference data.
# --------------------------------------------------------------------------------------------------------
def perturb(state, seed, std=0.05):
    """Every tensor plus seeded N(0, std^2) noise (a fresh DiT's adaLN-Zero outputs are all zeros)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=g) for k, v in state.items()}


def model_inputs(kwargs, n, seed):
    g = torch.Generator().manual_seed(seed)
    C, S = kwargs["in_channels"], kwargs["input_size"]
    x = torch.randn(n, C, S, S, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, kwargs["num_classes"], (n,), generator=g)
    return x, t, y


def model_reference(DiT, name, cfg):
    kwargs, seed = cfg["kwargs"], cfg["seed"]
    torch.manual_seed(seed)
    model = DiT(**kwargs)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    state = perturb(init_state, seed + 100)
    model.load_state_dict(state, strict=True)
    model.eval()
    x, t, y = model_inputs(kwargs, 4, seed + 200)
    rec = dict(kwargs=kwargs, seed=seed, init_state=init_state, state=state, x=x, t=t, y=y)
    with torch.no_grad():
        rec["out"] = model(x, t, y)
        if kwargs.get("class_dropout_prob", 0.1) > 0:
            # Training mode: the label drop draws torch.rand right after this seed (the first seed from
            # seed + 300 on that drops at least one label, so the reference shows the drop).
            model.train()
            for train_seed in range(seed + 300, seed + 400):
                torch.manual_seed(train_seed)
                out_train = model(x, t, y)
                if not torch.equal(out_train, rec["out"]):
                    break
            model.eval()
            rec.update(train_seed=train_seed, out_train=out_train)
            # forward_with_cfg, as sample.py calls it: x doubled, labels then null labels.
            x_cfg = torch.cat([x[:2], x[:2]])
            y_cfg = torch.cat([y[:2], torch.full((2,), kwargs["num_classes"])])
            t_cfg = torch.cat([t[:2], t[:2]])
            rec.update(x_cfg=x_cfg, t_cfg=t_cfg, y_cfg=y_cfg, cfg_scale=CFG_SCALE,
                       out_cfg=model.forward_with_cfg(x_cfg, t_cfg, y_cfg, CFG_SCALE))
    return model, rec


def _tensors(d):
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}


def diffusion_reference(create_diffusion, kwargs, model, mcfg, seed, use_cfg):
    """Everything one create_diffusion config computes with `model` (eval, no grad)."""
    diffusion = create_diffusion(**kwargs)
    g = torch.Generator().manual_seed(seed)
    C, S, K = mcfg["in_channels"], mcfg["input_size"], mcfg["num_classes"]
    n, T = 4, diffusion.num_timesteps
    x_start = torch.randn(n, C, S, S, generator=g).clamp(-1, 1)
    t = torch.tensor([0, 1, T // 2, T - 1])              # t = 0 takes the decoder-NLL branch of the vb
    noise = torch.randn(n, C, S, S, generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    x_t = torch.randn(n, C, S, S, generator=g)
    rec = dict(kwargs=kwargs, seed=seed, x_start=x_start, t=t, noise=noise, y=y, x_t=x_t,
               timestep_map=torch.tensor(diffusion.timestep_map))
    with torch.no_grad():
        rec["q_sample"] = diffusion.q_sample(x_start, t, noise=noise)
        rec["training_losses"] = _tensors(diffusion.training_losses(model, x_start, t, dict(y=y), noise=noise))
        for clip in (True, False):
            out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip, model_kwargs=dict(y=y))
            rec[f"p_mean_variance_clip{int(clip)}"] = _tensors(out)
        if T > 25:
            return rec
        # Sampling loops. With CFG, as sample.py: z doubled, labels then null labels, forward_with_cfg.
        if use_cfg:
            fn, shape = model.forward_with_cfg, (2 * (n // 2), C, S, S)
            z = torch.randn(n // 2, C, S, S, generator=g)
            z = torch.cat([z, z])
            mk = dict(y=torch.cat([y[: n // 2], torch.full((n // 2,), K)]), cfg_scale=CFG_SCALE)
        else:
            fn, shape = model, (n, C, S, S)
            z, mk = torch.randn(shape, generator=g), dict(y=y)
        rec.update(use_cfg=use_cfg, loop_noise=z, loop_model_kwargs=mk, loop_seed=seed + 1)
        cpu = torch.device("cpu")
        torch.manual_seed(seed + 1)
        rec["p_sample_loop_noise"] = diffusion.p_sample_loop(fn, shape, noise=z, clip_denoised=False,
                                                             model_kwargs=mk, device=cpu)
        torch.manual_seed(seed + 1)
        rec["p_sample_loop_seeded"] = diffusion.p_sample_loop(fn, shape, model_kwargs=mk, device=cpu)
        torch.manual_seed(seed + 1)
        rec["ddim_eta0_noise"] = diffusion.ddim_sample_loop(fn, shape, noise=z, clip_denoised=False,
                                                            model_kwargs=mk, device=cpu, eta=0.0)
        torch.manual_seed(seed + 1)
        rec["ddim_eta05_seeded"] = diffusion.ddim_sample_loop(fn, shape, model_kwargs=mk, device=cpu, eta=0.5)
    return rec


def meta(dit):
    return dict(dit_commit=DIT_COMMIT, dit_path=str(Path(dit).resolve()), torch=str(torch.__version__),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                timm=_TIMM_STANDIN, writer="tools/make_reference.py")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dit", required=True, help="local copy of facebookresearch/DiT at commit ed81ce2")
    ap.add_argument("--out", default=str(OUT), help="output directory")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # reductions in one fixed order
    DiT, create_diffusion = import_original(args.dit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    models, records = {}, {}
    for name, cfg in MODEL_CONFIGS.items():
        models[name], records[name] = model_reference(DiT, name, cfg)
    torch.save(dict(meta=meta(args.dit), configs=records), out / "models.pt")

    cases = {}
    for i, (name, (kwargs, mname)) in enumerate(DIFFUSION_CONFIGS.items()):
        rec = diffusion_reference(create_diffusion, kwargs, models[mname], MODEL_CONFIGS[mname]["kwargs"],
                                  seed=1000 + 10 * i, use_cfg=name in CFG_LOOP_CONFIGS)
        cases[name] = dict(rec, model=mname)
    torch.save(dict(meta=meta(args.dit), cases=cases), out / "diffusion.pt")
    for f in ("models.pt", "diffusion.pt"):
        print(f"{out / f}: {(out / f).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
