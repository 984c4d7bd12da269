"""Typed OmegaConf trees of config dataclasses, for merging YAML layers and overrides onto their defaults."""

from __future__ import annotations

import copy
import functools

from omegaconf import DictConfig, OmegaConf


def structured_defaults(cls: type) -> DictConfig:
    """The structured (typed, closed) tree of ``cls``'s defaults, writable at every level: OmegaConf makes
    the nodes of frozen dataclasses (e.g. the generation backends' configs) read-only, and a layer that sets
    one of their keys could not be merged onto it. A copy of the tree built once per class (building it
    walks the dataclasses and costs several times the copy)."""
    return copy.deepcopy(_defaults_tree(cls))


@functools.cache
def _defaults_tree(cls: type) -> DictConfig:
    tree = OmegaConf.structured(cls)
    _set_writable(tree)
    return tree


def _set_writable(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _set_writable(child)
