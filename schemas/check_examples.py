#!/usr/bin/env python3
"""Check the ragar JSON Schemas in this directory.

For every *.json file here: it must be a valid Draft 2020-12 schema with
$schema, $id, title, description and a non-empty "examples" array; every
object-typed subschema must set "additionalProperties": false; every example
must validate. A few known-bad documents must be rejected.

Usage: python3 schemas/check_examples.py   (needs: pip install jsonschema)
Exits 0 when everything passes, 1 otherwise.
"""
import copy
import json
import pathlib
import sys

try:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError, best_match
except ImportError:
    sys.exit("check_examples.py needs jsonschema: pip install jsonschema")

HERE = pathlib.Path(__file__).resolve().parent
DRAFT = "https://json-schema.org/draft/2020-12/schema"
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL " + msg)


def object_nodes(node, path="#"):
    """Yield (path, subschema) for every subschema declaring type object."""
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield path, node
        for key, value in node.items():
            if key in ("examples", "const", "enum", "default"):
                continue
            yield from object_nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from object_nodes(value, f"{path}/{i}")


def check_file(path):
    name = path.name
    before = len(failures)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        fail(f"{name}: not JSON: {e}")
        return None
    if schema.get("$schema") != DRAFT:
        fail(f"{name}: $schema is not {DRAFT}")
    for key in ("$id", "title", "description"):
        if not isinstance(schema.get(key), str) or not schema[key]:
            fail(f"{name}: missing {key}")
    if schema.get("$id", "").rsplit("/", 1)[-1] != name:
        fail(f"{name}: $id does not end with the file name")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        fail(f"{name}: not a valid Draft 2020-12 schema: {e.message}")
        return None
    for where, node in object_nodes(schema):
        if node.get("additionalProperties") is not False:
            fail(f"{name}: {where} is an object without additionalProperties: false")
    examples = schema.get("examples")
    if not isinstance(examples, list) or not examples:
        fail(f"{name}: no examples")
        examples = []
    validator = Draft202012Validator(schema)
    for i, example in enumerate(examples):
        err = best_match(validator.iter_errors(example))
        if err is not None:
            fail(f"{name}: examples[{i}] is invalid at {err.json_path}: {err.message}")
    if len(failures) == before:
        print(f"ok   {name}: valid Draft 2020-12 schema, {len(examples)} example(s) valid")
    return schema, validator


def expect_invalid(name, validator, base, label, change):
    doc = copy.deepcopy(base)
    change(doc)
    if validator.is_valid(doc):
        fail(f"{name}: accepted a bad document ({label})")


def negative_checks(loaded):
    if "ragar.event.v1.json" in loaded:
        schema, v = loaded["ragar.event.v1.json"]
        types = {e.get("type") for e in schema["examples"]}
        if not {"item", "interaction", "display"} <= types:
            fail("ragar.event.v1.json: needs one example per type")
        item, inter, disp = (next(e for e in schema["examples"] if e["type"] == t)
                             for t in ("item", "interaction", "display"))
        bad = [
            (item, "no embedding/image/text", lambda d: [d.pop(k, None) for k in ("embedding", "image", "text")]),
            (item, "image with base64 and uri", lambda d: d.update(image={"base64": item["image"]["base64"], "uri": "x"})),
            (item, "empty image", lambda d: d.update(image={})),
            (item, "image not PNG/JPEG", lambda d: d.update(image={"base64": "R0lGODlhAQABAAAAACw="})),
            (item, "bad base64", lambda d: d.update(image={"base64": "iVBORw0KGgo*"})),
            (item, "empty embedding", lambda d: d.update(embedding=[])),
            (item, "string in embedding", lambda d: d.update(embedding=[1, "2"])),
            (item, "item with user_id", lambda d: d.update(user_id="u1")),
            (item, "unknown field", lambda d: d.update(colour="red")),
            (item, "wrong schema", lambda d: d.update(schema="ragar.event.v2")),
            (item, "bad id", lambda d: d.update(item_id="-starts-with-dash")),
            (item, "negative ts", lambda d: d.update(ts=-1)),
            (item, "text too long", lambda d: d.update(text="x" * 4097)),
            (inter, "unknown action", lambda d: d.update(action="share")),
            (inter, "missing user_id", lambda d: d.pop("user_id")),
            (disp, "too many candidates", lambda d: d.update(candidates=17)),
            (disp, "seed too big", lambda d: d.update(seed=9007199254740992)),
            (disp, "display with embedding", lambda d: d.update(embedding=[1.0])),
            (disp, "unknown type", lambda d: d.update(type="click")),
            (disp, "missing type", lambda d: d.pop("type")),
            (inter, "base64 embedding (v2 only)", lambda d: d.update(embedding="AAAAPwAAgL4AAEA/AACAPw==")),
        ]
        for base, label, change in bad:
            expect_invalid("ragar.event.v1.json", v, base, label, change)
    if "ragar.event.v2.json" in loaded:
        schema, v = loaded["ragar.event.v2.json"]
        b64 = next(e for e in schema["examples"] if isinstance(e.get("embedding"), str))
        bad = [
            (b64, "embedding not base64", lambda d: d.update(embedding="AAAA*AAA")),
            (b64, "base64 without padding", lambda d: d.update(embedding="AAAAPwAAgL4AAEA/AACAPw")),
            (b64, "URL-safe base64", lambda d: d.update(embedding="AAAAPwAAgL4AAEA_AACAPw==")),
            (b64, "embedding as a number", lambda d: d.update(embedding=1.5)),
            (b64, "v1 schema name", lambda d: d.update(schema="ragar.event.v1")),
        ]
        for base, label, change in bad:
            expect_invalid("ragar.event.v2.json", v, base, label, change)
    if "ragar.image.v1.json" in loaded:
        schema, v = loaded["ragar.image.v1.json"]
        ex = schema["examples"][0]
        bad = [
            ("no candidates", lambda d: d.update(candidates=[])),
            ("tau zero", lambda d: d["weighting"].update(tau=0)),
            ("jpeg format", lambda d: d["image"].update(format="jpeg")),
            ("negative latency", lambda d: d["latency_ms"].update(total=-1)),
            ("missing models", lambda d: d.pop("models")),
        ]
        for label, change in bad:
            expect_invalid("ragar.image.v1.json", v, ex, label, change)
    if "ragar.dlq.v1.json" in loaded:
        schema, v = loaded["ragar.dlq.v1.json"]
        ex = schema["examples"][0]
        bad = [
            ("unknown ragar.* header", lambda d: d.update({"ragar.extra": "x"})),
            ("unknown kind", lambda d: d.update({"ragar.error.kind": "timeout"})),
            ("negative offset", lambda d: d.update({"ragar.source.offset": "-1"})),
            ("offset with sign", lambda d: d.update({"ragar.source.offset": "+1"})),
            ("non-string producer header", lambda d: d.update({"x-retry": 3})),
            ("missing ragar.error", lambda d: d.pop("ragar.error")),
        ]
        for label, change in bad:
            expect_invalid("ragar.dlq.v1.json", v, ex, label, change)
        good = dict(ex, **{"ragar": "a", "ragarx": "b", "RAGAR.x": "c", "": "d"})
        if not v.is_valid(good):
            fail("ragar.dlq.v1.json: rejected producer headers not starting with 'ragar.'")


def main():
    files = sorted(HERE.glob("*.json"))
    if not files:
        fail(f"no *.json schemas in {HERE}")
    loaded = {}
    for path in files:
        result = check_file(path)
        if result is not None:
            loaded[path.name] = result
    negative_checks(loaded)
    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print(f"all {len(files)} schema(s) OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
