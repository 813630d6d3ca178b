"""User components by ``_target_``: import them, check their keys, build them with what the data
provides.

A config node of a user's own component is ``_target_`` (a dotted path to a class or function in
the user's package) plus the keys of its constructor, with no schema registered anywhere. Before
anything is built, :func:`check_component` imports the target and checks the node's keys
against the target's signature (``inspect.signature``), so a typo fails at once, naming the key
and the parameters that exist; a module that cannot be imported fails naming the module and
where Python looked. :func:`build` then instantiates it with Hydra, passing in what the data
provides (``in_shape``, ``out_dim``, ``num_classes``, ``vocab_size``) only to a constructor that
asks for it by name.

This module imports no torch itself (a user's module may).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from trainer.config import ConfigError

#: keys Hydra's ``instantiate`` reads itself
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})


def _loader_key(group: str, key: str) -> str:
    """Where ``data.<key>`` is one of every DataModule's loader keys (``batch_size``): the fix,
    which the message left unsaid (a probe's)."""
    if group != "data":
        return ""
    from trainer.data.base import DataModule

    if key not in inspect.signature(DataModule.__init__).parameters:
        return ""
    return (
        f"; {key} is one of every DataModule's loader keys: a data module of one's own takes "
        "**common and passes it on, super().__init__(**common) (README, 'Bring your own')"
    )


def resolve_target(group: str, path: Any) -> Any:
    """The object ``path`` (``pkg.module.Name``) names; a :class:`ConfigError` that says why not
    and how to fix it otherwise."""
    key = f"{group}._target_"
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{key}: got {path!r}; give a dotted path such as mypkg.nets.MyNet")
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(
            f"{key}: got {path!r}, which names no module; give the full dotted path "
            "(mypkg.nets.MyNet, not MyNet)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        parent = missing.rpartition(".")[0]
        found = None
        named = module_name == missing or module_name.startswith(missing + ".")
        try:  # (the package imports: only the submodule the path names is missing)
            found = importlib.import_module(parent) if parent and named else None
        except Exception:  # noqa: BLE001 (then the message below)
            found = None
        if found is not None:
            where = getattr(found, "__path__", None) or [getattr(found, "__file__", "?")]
            raise ConfigError(
                f"{key}: cannot import {module_name!r} for {path!r}: {parent!r} imports (from "
                f"{', '.join(map(str, where))}) but has no module {missing.rpartition('.')[2]!r}"
                " (a typo in the path, or a file not there)"
            ) from None
        looked = "\n  ".join(p or "(the working directory)" for p in sys.path)
        raise ConfigError(
            f"{key}: cannot import {module_name!r} for {path!r}: no module named {missing!r}. "
            f"Make it importable: install your package (pip install -e /path/to/your/project) "
            f"or put the folder that holds {missing.split('.')[0]!r} on PYTHONPATH "
            f"(PYTHONPATH=/path/to/folder python scripts/train.py ...). Python looked in:\n  "
            f"{looked}"
        ) from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(
            f"{key}: importing {module_name!r} for {path!r} failed: {type(e).__name__}: {e}"
        ) from e
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ConfigError(
            f"{key}: module {module_name!r} has no {attr!r}; it defines: "
            f"{', '.join(public) or 'nothing public'}"
        )
    return getattr(module, attr)


def accepted_keys(target: Any) -> tuple[list[str], bool]:
    """The keyword parameters ``target`` accepts, and whether it takes any keyword at all.

    A class that forwards ``**kwargs`` to its base class accepts the base's parameters too (the
    walk follows the MRO while each ``__init__`` has ``**kwargs``); ``object`` and
    ``torch.nn.Module`` end the walk, since they refuse unknown keywords.
    """
    if not inspect.isclass(target):
        return _named(target)
    names: list[str] = []
    for cls in target.__mro__:
        if (
            cls is object
            or f"{cls.__module__}.{cls.__qualname__}" == "torch.nn.modules.module.Module"
        ):
            return names, False
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        own, var_kw = _named(init)
        names += [n for n in own if n not in names and n != "self"]
        if not var_kw:
            return names, False
    return names, False


def _named(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: cannot check
        return [], True
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in sig.parameters.values() if p.kind in kinds]
    var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def required_keys(target: Any) -> list[str]:
    """Parameters without a default (of the constructor, for a class)."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind in kinds and p.default is inspect.Parameter.empty and p.name != "self"
    ]


def check_component(
    group: str,
    node: Mapping[str, Any],
    reserved: Iterable[str] = (),
    provided: Iterable[str] = (),
) -> Any:
    """Import ``node['_target_']`` and check the node's keys against its signature; return the
    target.

    Args:
        group: the config key of the node (``model``, ``callbacks.printer``), for messages.
        reserved: keys of the node the project reads itself (``loss.mode``), not passed on.
        provided: keyword arguments the builder may pass from the data (``in_shape``, ...).
    """
    if "_target_" not in node:
        raise ConfigError(
            f"{group}: has neither a schema nor a _target_; choose a config from "
            f"configs/{group.split('.')[0]}/ or give _target_: your.module.Class plus its "
            "constructor's keys"
        )
    target = resolve_target(group, node["_target_"])
    if not callable(target):
        raise ConfigError(f"{group}._target_: {node['_target_']!r} is not a class or function")
    names, any_key = accepted_keys(target)
    if any_key:
        return target
    skip = HYDRA_KEYS | set(reserved)
    shown = _name(target)
    for key in node:
        if key in skip:
            continue
        if key not in names:
            raise ConfigError(
                f"{group}.{key}: {shown} has no parameter {key!r}; its parameters: "
                f"{', '.join(names) or 'none'}{_loader_key(group, key)}"
            )
    if not node.get("_partial_", False):
        provided = set(provided)
        missing = [k for k in required_keys(target) if k not in node and k not in provided]
        if missing:
            partial = (
                f"; or, if {shown} is itself the function to use (a loss function of "
                "(output, target)), add _partial_: true to its YAML file, so that it is "
                "handed over, not called"
                if not isinstance(target, type)
                else ""
            )
            raise ConfigError(
                f"{group}: {shown} needs {', '.join(missing)}, which the config does not set; "
                f"add {missing[0]}: ... to its YAML file or {group}.{missing[0]}=... to the "
                f"command line{partial}"
            )
    return target


def build(group: str, node: Any, provided: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node)``, passing each of ``provided`` (what the data gives:
    ``in_shape``, ``out_dim``, ...) that the target's signature names and the node does not set,
    and ``kwargs`` as they are. A constructor that still misses a required argument is an error
    naming it and what the data provides."""
    from hydra.utils import instantiate

    target = resolve_target(group, node["_target_"])
    names, _ = accepted_keys(target)
    given = {k: v for k, v in (provided or {}).items() if k in names and k not in node}
    missing = [
        k for k in required_keys(target) if k not in node and k not in given and k not in kwargs
    ]
    if missing and not node.get("_partial_", False):
        offered = ", ".join(f"{k}={v!r}" for k, v in (provided or {}).items()) or "nothing"
        raise ConfigError(
            f"{group}: {_name(target)} needs {', '.join(missing)}, which neither the config "
            f"sets nor the data provides (it provides {offered}); set {group}.{missing[0]}=... "
            "or have the data module provide it"
        )
    try:
        return instantiate(node, **given, **kwargs)
    except Exception as e:  # noqa: BLE001 (re-raised, named where it is a key of the config)
        refused = _refused_key(e, node, target)
        if refused is None or refused in accepted_keys(target)[0]:  # (one it takes: the
            raise  # error is from inside its constructor, a review's finding)
        refusal = ConfigError(
            f"{group}.{refused}: {_name(target)} takes no {refused!r} ({e.__cause__}); a key "
            f"of a built-in preset under a _target_ of one's own? give {group} a YAML file of "
            f"its own (README, 'Bring your own'), or replace the node: ~{group} "
            f"+{group}._target_=... +{group}.<key>=..."
        )
        # (a key of the built-in preset the node was composed from: the message is the whole
        # story, though the TypeError passed through one's own __init__, a DataModule's
        # super().__init__(**common), which kept Hydra's traceback, a probe's; a key of one's
        # own file refused there is one's own bug, whose traceback leads to it, a review's)
        refusal.whole_story = refused in _preset_keys(node)  # type: ignore[attr-defined]
        raise refusal from e


def _preset_keys(node: Any) -> set[str]:
    """The keys of the built-in preset ``node`` was composed from (its structured config,
    one of ``trainer.config``'s dataclasses); none for a node of one's own."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        return set()
    kind = OmegaConf.get_type(node)
    if not (dataclasses.is_dataclass(kind) and kind.__module__ == "trainer.config"):
        return set()
    return {f.name for f in dataclasses.fields(kind)}


def _refused_key(error: BaseException, node: Any, target: Any) -> str | None:
    """The config key the target itself refused as an unexpected keyword (Hydra's
    InstantiationException over the TypeError: a data._target_ of one's own on the digits
    preset got its val_fraction, and the error named no key: a probe's finding), or None: the
    refusing function must be the target's (a function's own name, or the ``__init__`` of a
    class in its MRO, where ``**kwargs`` went): a keyword refused by something its
    constructor calls (a Dropout, a nested node's class) is its own bug, left as Hydra
    reports it (two reviews' findings)."""
    cause = error.__cause__
    if not isinstance(cause, TypeError):
        return None
    if isinstance(target, functools.partial):
        target = target.func
    own = {getattr(target, "__qualname__", ""), getattr(target, "__name__", "")} - {""}
    for c in getattr(target, "__mro__", ()):  # (torch's Module names type(self).__name__)
        own |= {f"{n}.{m}" for n in (c.__qualname__, c.__name__) for m in ("__init__", "__new__")}
    found = re.search(r"([\w.<>]+)\(\) got an unexpected keyword argument '(\w+)'", str(cause))
    if found:
        return found.group(2) if found.group(2) in node and found.group(1) in own else None
    # a class without an __init__ of its own takes none of the preset's keys: Python says
    # "GaussNLL() takes no arguments" (Hydra's error named no key, a probe's): the first
    none = re.search(r"([\w.<>]+)\(\) takes no arguments", str(cause))
    keys = [k for k in node if isinstance(k, str) and not k.startswith("_")]
    return keys[0] if none and none.group(1) in own and keys else None


def _name(target: Any) -> str:
    if isinstance(target, functools.partial):  # (its function)
        target = target.func
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
