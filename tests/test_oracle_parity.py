"""TEMPORARY: the rewritten models.py / diffusion/ against a frozen copy of the previous code
(tests/_oracle), bit for bit. Deleted together with tests/_oracle once the rewrite agrees."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

import dit_fast.diffusion as new_diff
import dit_fast.models as new_models
import tests._oracle.diffusion as old_diff
import tests._oracle.models as old_models


def same(a, b, what=""):
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            same(u, v, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b), f"{what}: max diff {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=what)
        assert np.asarray(b).dtype == a.dtype, what
    else:
        assert a == b, what


# ---------------------------------------------------------------------------------------- models

TINY = dict(depth=2, hidden_size=48, num_heads=2, input_size=16, num_classes=10)


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def both(name, **kw):
    out = []
    for mod in (old_models, new_models):
        torch.manual_seed(0)
        out.append(mod.build_model(name, **{**TINY, **kw}))
    return out


@pytest.mark.parametrize("name", list(new_models.DiT_models))
def test_models_init_forward_cfg(name):
    for kw in (dict(), dict(learn_sigma=False, class_dropout_prob=0.0), dict(input_size=(8, 16), in_channels=3)):
        old, new = both(name, **kw)
        same(dict(old.state_dict()), dict(new.state_dict()), f"{name} init {kw}")
        assert [n for n, _ in old.named_parameters()] == [n for n, _ in new.named_parameters()]
        assert [p.requires_grad for p in old.parameters()] == [p.requires_grad for p in new.parameters()]
        C = kw.get("in_channels", 4)
        H, W = (kw.get("input_size"),) * 2 if isinstance(kw.get("input_size"), int) else kw.get("input_size", (16, 16))
        g = torch.Generator().manual_seed(2)
        x = torch.randn(4, C, H, W, generator=g)
        t = torch.tensor([0, 999, 998, 17])
        y = torch.tensor([1, 2, 10 if kw.get("class_dropout_prob", 0.1) else 3, 9])
        for m in (old, new):
            randomize(m)
        for train in (False, True):
            outs, grads = [], []
            for m in (old, new):
                m.train(train)
                torch.manual_seed(3)
                o = m(x, t, y)
                (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
                outs.append(o.detach())
                grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
                m.zero_grad(set_to_none=True)
            same(outs[0], outs[1], f"{name} forward train={train}")
            same(grads[0], grads[1], f"{name} grads train={train}")
        for m in (old, new):
            m.eval()
        xc = torch.cat([x[:2], x[:2]])
        yc = torch.tensor([1, 2, 10, 10]) if kw.get("class_dropout_prob", 0.1) else y
        with torch.no_grad():
            for extra in (dict(), dict(guide_all_channels=True)):
                if C < 3 and not extra:
                    continue
                same(old.forward_with_cfg(xc, t, yc, 4.0, **extra), new.forward_with_cfg(xc, t, yc, 4.0, **extra),
                     f"{name} cfg {extra}")


def test_model_attributes_and_checkpointing():
    old, new = both("DiT-S/2", grad_checkpointing=0.5, depth=4)
    for attr in ("learn_sigma", "in_channels", "out_channels", "patch_size", "num_heads", "num_classes"):
        assert getattr(old, attr) == getattr(new, attr), attr
    assert [b.grad_checkpointing for b in old.blocks] == [b.grad_checkpointing for b in new.blocks]
    assert new_models.patch_size_of("DiT-B/4") == 4
    t = torch.tensor([0.0, 1.5, 999.0])
    same(old_models.TimestepEmbedder.timestep_embedding(t, 256), new_models.timestep_embedding(t, 256))
    same(old_models.TimestepEmbedder.timestep_embedding(t, 33), new_models.timestep_embedding(t, 33))
    same(old_models.get_2d_sincos_pos_embed(64, (3, 5)), new_models.sincos_pos_embed_2d(64, (3, 5)))


# ------------------------------------------------------------------------------------- diffusion

class Toy(nn.Module):
    def __init__(self, C, learn_sigma, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.C, self.learn_sigma = C, learn_sigma
        self.w = nn.Parameter(torch.randn(2 * C if learn_sigma else C, C + 1, generator=g) * 0.5)

    def forward(self, x, t, y=None):
        tt = (t.float() / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        out = torch.einsum("oc,nchw->nohw", self.w, torch.cat([x, tt], 1))
        if self.learn_sigma:
            out = torch.cat([out[:, :self.C], torch.tanh(out[:, self.C:])], 1)
        return out


RESPACINGS = ["", "25", "ddim10", "4,3"]
CONFIGS = [dict(noise_schedule=s, learn_sigma=ls, sigma_small=ss, predict_xstart=px, use_kl=kl, rescale_learned_sigmas=rs)
           for s, (ls, ss), px, (kl, rs) in itertools.product(
               ["linear", "squaredcos_cap_v2"], [(True, False), (False, False), (False, True)], [False, True],
               [(False, False), (True, False), (False, True)])]
assert len(CONFIGS) == 36
TABLES = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
          "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2"]


def check_diffusion_pair(od, nd, learn_sigma, what, loops=True):
    for name in TABLES:
        same(getattr(od, name), getattr(nd, name), f"{what} {name}")
    assert od.num_timesteps == nd.num_timesteps
    assert list(getattr(od, "timestep_map", [])) == list(getattr(nd, "timestep_map", []))
    for attr in ("model_mean_type", "model_var_type", "loss_type"):
        assert getattr(od, attr).name == getattr(nd, attr).name
    C, N = 2, 3
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 256, (N, C, 4, 4), generator=g).float() / 127.5 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    noise = torch.randn(N, C, 4, 4, generator=g)
    xt = torch.randn(N, C, 4, 4, generator=g) * 1.5
    S = nd.num_timesteps
    t = torch.tensor([0, S // 2, S - 1])
    same(od.q_sample(x0, t, noise=noise), nd.q_sample(x0, t, noise=noise), f"{what} q_sample")
    same(od.q_mean_variance(x0, t), nd.q_mean_variance(x0, t), f"{what} q_mean_variance")
    same(od.q_posterior_mean_variance(x0, xt, t), nd.q_posterior_mean_variance(x0, xt, t), f"{what} posterior")
    torch.manual_seed(9)
    a = od.q_sample(x0, t)
    torch.manual_seed(9)
    same(a, nd.q_sample(x0, t), f"{what} q_sample drawn")
    model = Toy(C, learn_sigma)
    kw = dict(y=torch.zeros(N))
    for clip, dfn in ((True, None), (False, None), (True, lambda z: z * 0.5)):
        same(od.p_mean_variance(model, xt, t, clip_denoised=clip, denoised_fn=dfn, model_kwargs=kw),
             nd.p_mean_variance(model, xt, t, clip_denoised=clip, denoised_fn=dfn, model_kwargs=kw),
             f"{what} p_mean_variance clip={clip}")
    # training losses, values and gradients; given noise and drawn noise
    res = []
    for d in (od, nd):
        for noise_arg in (noise, None):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(4)
            terms = d.training_losses(model, x0, t, model_kwargs=kw, noise=noise_arg)
            terms["loss"].sum().backward()
            res.append((terms, model.w.grad.clone()))
    same(res[0], res[2], f"{what} training_losses")
    same(res[1], res[3], f"{what} training_losses drawn noise")
    cond_fn = lambda x, t, y=None: torch.sin(x) * 0.1 + t.float().view(-1, 1, 1, 1) * 1e-3
    for fn, extra in (("p_sample", dict()), ("p_sample", dict(cond_fn=cond_fn)),
                      ("ddim_sample", dict()), ("ddim_sample", dict(eta=0.5, cond_fn=cond_fn)),
                      ("ddim_reverse_sample", dict()), ("ddim_reverse_sample", dict(cond_fn=cond_fn))):
        outs = []
        for d in (od, nd):
            torch.manual_seed(6)
            outs.append(getattr(d, fn)(model, xt, t, model_kwargs=kw, **extra))
            outs.append(torch.randn(2))  # RNG position afterwards
        same(outs[:2], outs[2:], f"{what} {fn} {extra}")
    pmv = od.p_mean_variance(model, xt, t, model_kwargs=kw)
    same(od.condition_mean(cond_fn, pmv, xt, t, model_kwargs=kw), nd.condition_mean(cond_fn, pmv, xt, t, model_kwargs=kw))
    same(od.condition_score(cond_fn, pmv, xt, t, model_kwargs=kw), nd.condition_score(cond_fn, pmv, xt, t, model_kwargs=kw))
    if not loops:
        return
    shape = (N, C, 4, 4)
    for fn, extra in (("p_sample_loop", dict()), ("p_sample_loop", dict(clip_denoised=False, cond_fn=cond_fn)),
                      ("ddim_sample_loop", dict()), ("ddim_sample_loop", dict(eta=0.7)),
                      ("p_sample_loop_progressive", dict()), ("ddim_sample_loop_progressive", dict(eta=0.3))):
        outs = []
        for d in (od, nd):
            torch.manual_seed(8)
            o = getattr(d, fn)(model, shape, model_kwargs=kw, **extra)
            outs.append(list(o) if fn.endswith("progressive") else o)
            outs.append(torch.randn(2))
        same(outs[:2], outs[2:], f"{what} {fn} {extra}")
        if fn == "p_sample_loop" and not extra:
            torch.manual_seed(8)
            same(outs[0], nd.p_sample_loop(model, shape, noise=torch.randn(*shape), model_kwargs=kw), what)
    if S <= 25:
        outs = []
        for d in (od, nd):
            torch.manual_seed(10)
            outs.append(d.calc_bpd_loop(model, x0, model_kwargs=kw))
        same(outs[0], outs[1], f"{what} calc_bpd_loop")


@pytest.mark.parametrize("i", range(36))
def test_diffusion_config(i):
    cfg = CONFIGS[i]
    respacing = RESPACINGS[i % len(RESPACINGS)]
    od, nd = old_diff.create_diffusion(respacing, **cfg), new_diff.create_diffusion(respacing, **cfg)
    check_diffusion_pair(od, nd, cfg["learn_sigma"], f"{cfg} {respacing!r}", loops=respacing != "")
    if respacing == "":  # loops on a short respaced copy of the same config
        od, nd = old_diff.create_diffusion("7", **cfg), new_diff.create_diffusion("7", **cfg)
        check_diffusion_pair(od, nd, cfg["learn_sigma"], f"{cfg} '7'")


@pytest.mark.parametrize("var,loss", [("LEARNED", "KL"), ("LEARNED", "RESCALED_MSE"), ("FIXED_LARGE", "KL"),
                                      ("LEARNED_RANGE", "KL"), ("FIXED_SMALL", "RESCALED_KL")])
def test_direct_gaussian_diffusion(var, loss):
    betas = new_diff.get_named_beta_schedule("squaredcos_cap_v2", 30)
    ds = [mod.GaussianDiffusion(betas=betas, model_mean_type=mod.ModelMeanType.EPSILON,
                                model_var_type=mod.ModelVarType[var], loss_type=mod.LossType[loss])
          for mod in (old_diff, new_diff)]
    check_diffusion_pair(*ds, var.startswith("LEARNED"), f"{var} {loss}")


def test_schedule_and_loss_functions():
    for name, T in (("linear", 1000), ("linear", 40), ("squaredcos_cap_v2", 1000), ("squaredcos_cap_v2", 7)):
        same(old_diff.get_named_beta_schedule(name, T), new_diff.get_named_beta_schedule(name, T))
    for name in ("quad", "linear", "warmup10", "warmup50", "const", "jsd"):
        same(old_diff.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=50),
             new_diff.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=50))
    f = lambda t: 1 - t ** 2
    same(old_diff.betas_for_alpha_bar(20, f), new_diff.betas_for_alpha_bar(20, f))
    same(old_diff.betas_for_alpha_bar(20, f, max_beta=0.5), new_diff.betas_for_alpha_bar(20, f, max_beta=0.5))
    for T, spec in ((1000, "250"), (1000, "ddim50"), (300, "10,20,30"), (10, "3,3,3"), (10, [1]), (1000, "27"),
                    (100, [7, 0, 3]), (1000, 13)):
        assert old_diff.space_timesteps(T, spec) == new_diff.space_timesteps(T, spec), spec
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(3, 5, generator=g) for _ in range(4))
    same(old_diff.normal_kl(a, b, c, d), new_diff.normal_kl(a, b, c, d))
    same(old_diff.normal_kl(a, b, 0.0, 0.0), new_diff.normal_kl(a, b, 0.0, 0.0))
    same(old_diff.normal_kl(0.0, 0.0, a, b), new_diff.normal_kl(0.0, 0.0, a, b))
    same(old_diff.mean_flat(a), new_diff.mean_flat(a))
    same(old_diff.approx_standard_normal_cdf(a * 3), new_diff.approx_standard_normal_cdf(a * 3))
    x = torch.randint(0, 256, (3, 5), generator=g).float() / 127.5 - 1
    x[0, :2] = torch.tensor([-1.0, 1.0])
    same(old_diff.discretized_gaussian_log_likelihood(x, means=a, log_scales=b - 3),
         new_diff.discretized_gaussian_log_likelihood(x, means=a, log_scales=b - 3))
    same(old_diff.continuous_gaussian_log_likelihood(x, means=a, log_scales=b),
         new_diff.continuous_gaussian_log_likelihood(x, means=a, log_scales=b))
