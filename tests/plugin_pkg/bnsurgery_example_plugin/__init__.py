"""Example bnsurgery plugin: the `tag` pass and the `example-bn-count` / `example-broken`
checks (the second one always raises, to show that a crashing plugin is reported by name)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from bnsurgery.passes import PassResult
from bnsurgery.validation.checks import Finding

TAG_KEY = "bnsurgery.example.tag"


@dataclass
class TagReport:
    key: str
    value: str

    def to_dict(self) -> dict:
        return {"key": self.key, "value": self.value}


class TagPass:
    """Write a metadata_props entry (bnsurgery.example.tag) into the model."""

    name = "tag"
    in_place = False

    def __init__(self, *, value: str = "checked") -> None:
        self.value = value

    def __call__(self, model):
        tagged = copy.deepcopy(model)
        for prop in tagged.metadata_props:
            if prop.key == TAG_KEY:
                prop.value = self.value
                break
        else:
            entry = tagged.metadata_props.add()
            entry.key, entry.value = TAG_KEY, self.value
        return PassResult(tagged, TagReport(TAG_KEY, self.value), modified=True)


def bn_count(ctx):
    """Count the model's BatchNormalization nodes (info)."""
    yield Finding(
        "example-bn-count",
        "info",
        f"{len(ctx.batchnorms())} BatchNormalization node(s)",
        hint="nothing to do",
    )


def broken(ctx):
    """A check with a bug: it always raises."""
    raise RuntimeError("example plugin failure")
