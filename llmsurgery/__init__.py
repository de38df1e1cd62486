"""llmsurgery: model surgery and compression for causal language models.

The Python API runs the same passes, checks and runner as the command line:

    from llmsurgery import load, run_passes, PruneBI, Heal
    model = load("smollm2-135m")
    reports = run_passes(model, [PruneBI(remove=4), Heal(steps=50)], output="smollm2-pruned")

Each pass is a config class (`PruneBI`, `RotateSparsify`, `Absorb`, `KVCompress`, `Heal`) whose fields are
the command's options; each report is typed. Names load lazily, so `import llmsurgery` stays light.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load": ("model_io", "load_model"),
    "save": ("model_io", "save_model"),
    "run_passes": ("runner", "run_passes"),
    "CalibConfig": ("passes", "CalibConfig"),
    "PASSES": ("passes", "PASSES"),
    "PruneBI": ("passes", "PruneBI"),
    "RotateSparsify": ("passes", "RotateSparsify"),
    "Absorb": ("passes", "Absorb"),
    "KVCompress": ("passes", "KVCompress"),
    "Heal": ("passes", "Heal"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmsurgery' has no attribute '{name}'")
    from importlib import import_module

    module, attr = _EXPORTS[name]
    return getattr(import_module(f"llmsurgery.{module}"), attr)
