"""The import paths of hirm_jax 0.1 (one flat package), kept working for one release.

`import hirm_jax.train` or `from hirm_jax.export import load_run` still work: the old module is
a thin stand-in, made on first import, whose names are looked up in the modules that own them
now (in the order listed) and which warns once (DeprecationWarning) with the new path. Nothing
is imported before an old path is used. To be removed in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> the modules that own its names now (searched in order)
OLD_PATHS: dict[str, tuple[str, ...]] = {
    "hirm_jax.model": ("hirm_jax.encoder.clip",),
    "hirm_jax.weights": ("hirm_jax.encoder.clip_weights",),
    "hirm_jax.t5": ("hirm_jax.encoder.t5",),
    "hirm_jax.t5_weights": ("hirm_jax.encoder.t5_weights",),
    "hirm_jax.architectures": ("hirm_jax.encoder.architectures",),
    "hirm_jax.layouts": ("hirm_jax.encoder.layouts", "hirm_jax.encoder.files"),
    "hirm_jax.tokenizer": ("hirm_jax.encoder.tokenizer",),
    "hirm_jax.testing": ("hirm_jax.encoder.testing",),
    "hirm_jax.prompts": ("hirm_jax.erase.prompts",),
    "hirm_jax.problem": ("hirm_jax.erase.jobs",),
    "hirm_jax.objectives": ("hirm_jax.erase.objectives",),
    "hirm_jax.masking": ("hirm_jax.erase.masking",),
    "hirm_jax.sharding": ("hirm_jax.erase.sharding",),
    "hirm_jax.checkpoint": ("hirm_jax.erase.checkpoint",),
    "hirm_jax.train": ("hirm_jax.run", "hirm_jax.erase.loop", "hirm_jax.erase.step", "hirm_jax.erase.setup",
                       "hirm_jax.erase.workdir", "hirm_jax.report.loss_plot"),
    "hirm_jax.export": ("hirm_jax.artifacts.export", "hirm_jax.artifacts.delta", "hirm_jax.erase.workdir",
                        "hirm_jax.pipelines.patch"),
    "hirm_jax.delta": ("hirm_jax.artifacts.delta", "hirm_jax.fileio", "hirm_jax.pipelines.patch"),
    "hirm_jax.textreport": ("hirm_jax.report.textreport",),
    "hirm_jax.compare": ("hirm_jax.report.compare",),
    "hirm_jax.generate": ("hirm_jax.pipelines.generate",),
    "hirm_jax.demo": ("hirm_jax.world.demo",),
    "hirm_jax.world_benchmark": ("hirm_jax.world.benchmark",),
}


# old module run with `python -m` -> (module run as __main__ now, arguments put first)
OLD_MAINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hirm_jax.generate": ("hirm_jax.cli", ("generate",)),  # accelerate launch -m hirm_jax.generate ...
    "hirm_jax.delta": ("hirm_jax.artifacts.delta", ()),  # python -m hirm_jax.delta ... (no JAX)
}


class _OldModule(types.ModuleType):
    """Looks its names up in the new modules, importing them on first use."""

    def __init__(self, name: str, owners: tuple[str, ...]):
        super().__init__(name, f"Deprecated: moved to {', '.join(owners)}.")
        self.__owners = owners

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for owner in self.__owners:
            module = importlib.import_module(owner)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (now {', '.join(self.__owners)}) has no attribute {attr!r}")

    def __dir__(self):
        return sorted({n for o in self.__owners for n in dir(importlib.import_module(o)) if not n.startswith("_")})


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in OLD_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        owners = OLD_PATHS[spec.name]
        warnings.warn(f"{spec.name} is deprecated: import from {owners[0]}"
                      + (f" (or {', '.join(owners[1:])})" if owners[1:] else "") + "; the old path goes in 0.3",
                      DeprecationWarning, stacklevel=3)
        return _OldModule(spec.name, owners)

    def exec_module(self, module):
        pass

    def get_code(self, fullname):
        """`python -m <old path>`: run the module that has the command now, as __main__."""
        if fullname not in OLD_MAINS:
            raise ImportError(f"{fullname} cannot be run with -m; run `hirm-jax` instead")
        target, first = OLD_MAINS[fullname]
        source = f"import runpy, sys\nsys.argv[1:1] = {list(first)!r}\nrunpy.run_module({target!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{fullname}: moved to {target}>", "exec")


def install() -> None:
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
