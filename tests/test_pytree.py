"""Pytree dataclasses whose tree structures name their class (`ddcm_jax.pytree`).

jaxlib 0.10's `register_dataclass` makes the structures of two classes with the
same fields compare equal; `jit`'s dispatch cache then ran the `ddcm` rule's
program for a `rule="random"` call (CI, 2026-12-02). These tests hold the
package to structures that differ by class, and check that `jit` keeps the
programs of many look-alike classes apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ddcm_jax
from ddcm_jax import operators, selection
from ddcm_jax.codebook import AtomSource
from ddcm_jax.pytree import pytree_dataclass, static_field
from ddcm_jax.spec import CodeSpec
from ddcm_jax.stepping import as_key

structure = jax.tree_util.tree_structure


def test_rules_with_the_same_fields_have_different_structures():
    assert structure(selection.DDCM()) != structure(selection.Random())
    assert structure(selection.Turbo(3)) != structure(selection.GuidedSubset(3))
    assert structure(selection.Turbo(3)) == structure(selection.Turbo(3))
    assert hash(structure(selection.Turbo(3))) == hash(structure(selection.Turbo(3)))
    assert structure(selection.Turbo(3)) != structure(selection.Turbo(4))
    ddcm = CodeSpec.create(steps=4, codebook_size=8, rule="ddcm")
    assert structure(ddcm) != structure(ddcm.replace(rule=selection.Random()))


def test_jit_keeps_the_programs_of_look_alike_classes_apart():
    """100 classes with no fields, each returning its own number from one jitted function.

    Registered with `jax.tree_util.register_dataclass` instead, 16 of these 100 calls
    returned another class's number on jax 0.10.2 (measured).
    """

    def make(i: int) -> type:
        return pytree_dataclass(type(f"Rule{i}", (), {"value": i, "__annotations__": {}}))

    classes = [make(i) for i in range(100)]
    f = jax.jit(lambda r, x: x + r.value)
    got = [int(f(c(), jnp.int32(0))) for c in classes]
    assert got == [c.value for c in classes]


def test_compress_with_another_rule_runs_that_rule(tiny_model_dir):
    """The failure seen in CI, asserted directly: same settings, rule "random" vs "ddcm"."""
    model = ddcm_jax.load_model(tiny_model_dir)
    x = np.clip(np.random.default_rng(0).standard_normal((16, 16, 3)) * 0.5, -1, 1).astype(np.float32)
    kw = dict(steps=8, codebook_size=64, key=3)
    coded = ddcm_jax.compress(model, x, **kw)
    rand = ddcm_jax.compress(model, x, rule="random", **kw)
    # The random rule's index of step i is its own key's draw (`Random.select`), not an argmax:
    # steps run i = 7 .. 0, the rows are i = 7 .. 1 (the last step adds no noise).
    rule_root = jax.random.fold_in(as_key(3), 2)
    expected = [int(jax.random.randint(jax.random.fold_in(rule_root, i), (1,), 0, 64, jnp.int32)[0])
                for i in range(7, 0, -1)]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(rand.indices).ravel(), expected)
    assert not np.array_equal(np.asarray(coded.indices), np.asarray(rand.indices))


def test_fields_round_trip_with_key_paths():
    @pytree_dataclass
    class Pair:
        a: jax.Array
        n: int = static_field(2)
        b: jax.Array | None = None

    p = Pair(jnp.ones(3), 5, jnp.zeros(2))
    leaves, tree = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 2
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert type(back) is Pair and back.n == 5
    np.testing.assert_array_equal(back.a, p.a)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
    assert paths == [".a", ".b"]
    doubled = jax.jit(lambda q: jax.tree_util.tree_map(lambda v: 2 * v, q))(p)
    assert doubled.n == 5
    np.testing.assert_array_equal(doubled.a, 2 * np.ones(3))
    # The package's own: a codebook and a spec survive jit and vmap unchanged.
    src = AtomSource(8, (2, 2), "philox", root=jax.random.key(0), step=jnp.int32(1))
    again = jax.jit(lambda s: s)(src)
    assert (again.size, again.shape, again.generator) == (8, (2, 2), "philox")
    assert structure(operators.SuperResolution(2)) != structure(operators.SuperResolution(4))


def test_no_module_registers_dataclasses_with_jax_directly():
    """Every pytree dataclass of the package goes through `pytree_dataclass`."""
    package = Path(ddcm_jax.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "register_dataclass":
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == []
