"""Compare dit_fast.transport with SiT's own transport package, number for number, on the CPU.

    python tools/sit_parity.py --sit /path/to/SiT        # a checkout of willisma/SiT; needs torchdiffeq

Both are run on the same seeded inputs with a small nonlinear stand-in model: the training losses of
every path x prediction x weighting, the ODE (euler, heun2, midpoint, dopri5; forward and reverse; fp32,
bf16 and fp16 states) and the SDE (Euler and Heun x every diffusion form x every last step). The
likelihood ODE is left out (its log p agrees to 1 ulp, not bit for bit). Prints each mismatch and exits
1 if any result differs (NaN on both sides counts as equal: SiT's default SBDM SDE is singular at t = 0
for velocity models on Linear/GVP, and so is ours).
"""
import argparse
import itertools
import sys

import torch

REPO_PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "score", "noise")


def stand_in(x, t, y=None, cfg_scale=1.0):
    # Returns x's dtype, as a low-precision network does (the order of dt * f then matters).
    out = (torch.tanh(x) * (1 + t.view(-1, 1, 1, 1)) - 0.3 * x) * cfg_scale
    return (out if y is None else out + 0.01 * y.view(-1, 1, 1, 1)).to(x.dtype)


def same(a, b):
    if isinstance(a, type) or isinstance(b, type):
        return a is b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(p, q) for p, q in zip(a, b))
    both_nan = torch.isnan(a).any() and torch.isnan(b).any()
    return bool(both_nan) or (a.dtype == b.dtype and torch.equal(a, b))


def seeded(fn, seed):
    """fn()'s result, or the type of what it raised (both sides failing alike counts as agreement:
    e.g. dopri5 started on a singular end underflows its step in torchdiffeq either way)."""
    torch.manual_seed(seed)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - compared, not hidden: a one-sided failure is reported
        return type(e)


def cases(ours, theirs):
    """(label, our thunk, their thunk) for every comparison."""
    for path, pred in itertools.product(REPO_PATHS, PREDICTIONS):
        weights = (None,) if pred == "velocity" else (None, "velocity", "likelihood")
        for weight in weights:
            a, b = ours.create_transport(path, pred, weight), theirs.create_transport(path, pred, weight)
            x1 = torch.randn(4, 3, 5, 5)
            yield (f"loss {path} {pred} {weight}", lambda a=a, x1=x1: a.training_losses(stand_in, x1)["loss"],
                   lambda b=b, x1=x1: b.training_losses(stand_in, x1)["loss"])
        a, b = ours.Sampler(ours.create_transport(path, pred)), theirs.Sampler(theirs.create_transport(path, pred))
        for dtype, method, reverse in itertools.product((torch.float32, torch.bfloat16, torch.float16),
                                                        ("euler", "heun2", "midpoint", "dopri5"), (False, True)):
            if method == "dopri5" and dtype != torch.float32:
                continue
            z, kw = torch.randn(4, 3, 5, 5).to(dtype), dict(y=torch.arange(4.0).to(dtype), cfg_scale=1.5)
            opts = dict(sampling_method=method, num_steps=7, reverse=reverse)
            yield (f"ode {path} {pred} {method} {dtype} reverse={reverse}",
                   lambda a=a, z=z, kw=kw, o=opts: a.sample_ode(**o)(z, stand_in, **kw),
                   lambda b=b, z=z, kw=kw, o=opts: b.sample_ode(**o)(z, stand_in, **kw))
        forms = ("SBDM", "sigma", "linear", "decreasing", "inccreasing-decreasing")
        for method, form, last in itertools.product(("Euler", "Heun"), forms, ("Mean", "Tweedie", "Euler", None)):
            z, opts = torch.randn(4, 3, 5, 5), dict(sampling_method=method, diffusion_form=form, last_step=last,
                                                    num_steps=12)
            yield (f"sde {path} {pred} {method} {form} {last}",
                   lambda a=a, z=z, o=opts: a.sample_sde(**o)(z, stand_in),
                   lambda b=b, z=z, o=opts: b.sample_sde(**o)(z, stand_in))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sit", required=True, help="a checkout of willisma/SiT (its transport/ package is imported)")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.sit)
    import transport as theirs   # SiT's package, from the checkout
    import dit_fast.transport as ours

    torch.set_grad_enabled(False)   # as SiT's sample.py runs (its likelihood needs it)
    failures = total = degenerate = 0
    for seed, (label, mine, sit) in enumerate(cases(ours, theirs)):
        total += 1
        a, b = seeded(mine, seed), seeded(sit, seed)
        if not same(a, b):
            failures += 1
            print(f"DIFFERS: {label}")
        elif isinstance(a, type) or not all(torch.isfinite(x).all() for x in (a if isinstance(a, list) else [a])):
            degenerate += 1
    print(f"{total - failures} of {total} comparisons agree: bit for bit, or ({degenerate} of them) both "
          "non-finite / both raising the same error")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
