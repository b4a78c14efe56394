"""JSON schemas of varied shape for the structured-output tests, each with a prompt that asks for it.

Strings and arrays carry bounds where a model left alone could go on forever: a random tiny model
must still finish within the test's token budget, so every answer can be checked as a whole.
"""
from __future__ import annotations

S = {"type": "string", "maxLength": 12}
SHORT = {"type": "string", "maxLength": 6}


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}


SCHEMAS: list[tuple[str, dict]] = [
    ("a person with a name and an age", obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a city and its country", obj({"city": S, "country": S})),
    ("a yes/no answer", obj({"answer": {"type": "boolean"}})),
    ("a sentiment label", obj({"sentiment": {"enum": ["positive", "negative", "neutral"]}})),
    ("a temperature in Celsius", obj({"celsius": {"type": "number", "minimum": -90, "maximum": 60}})),
    ("a score from 1 to 5", obj({"score": {"type": "integer", "minimum": 1, "maximum": 5}})),
    ("up to three colours", obj({"colors": {"type": "array", "items": SHORT, "maxItems": 3}})),
    ("exactly two numbers", obj({"pair": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                      "maximum": 99}, "minItems": 2, "maxItems": 2}})),
    ("a book with title, author and year",
     obj({"title": S, "author": S, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}})),
    ("an address", obj({"address": obj({"street": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("a product with an optional discount",
     obj({"product": S, "price": {"type": "number", "minimum": 0, "maximum": 1000},
          "discount": {"type": "number", "minimum": 0, "maximum": 1}}, required=["product", "price"])),
    ("a to-do item", obj({"task": S, "done": {"type": "boolean"}, "priority": {"enum": ["low", "high"]}})),
    ("a point", obj({"x": {"type": "number", "minimum": -10, "maximum": 10},
                     "y": {"type": "number", "minimum": -10, "maximum": 10}})),
    ("a weekday", obj({"day": {"enum": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}})),
    ("a list of up to two people",
     obj({"people": {"type": "array", "maxItems": 2, "items": obj({"name": SHORT, "age": {
         "type": "integer", "minimum": 0, "maximum": 99}})}})),
    ("a null or a number", obj({"value": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}]}})),
    ("a date", obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}})),
    ("an email address", obj({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}})),
    ("a constant type tag and a name", obj({"type": {"const": "user"}, "name": S})),
    ("a tree node with children via $ref",
     {"$defs": {"leaf": obj({"id": {"type": "integer", "minimum": 0, "maximum": 9}})},
      **obj({"id": {"type": "integer", "minimum": 0, "maximum": 9},
             "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2}})}),
    ("a rectangle by $ref to a size",
     {"$defs": {"size": {"type": "integer", "minimum": 1, "maximum": 50}},
      **obj({"width": {"$ref": "#/$defs/size"}, "height": {"$ref": "#/$defs/size"}})}),
    ("a bare number", {"type": "integer", "minimum": 0, "maximum": 1000}),
    ("a bare enum", {"enum": ["red", "green", "blue"]}),
    ("a bare array of booleans", {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4}),
    ("an HTTP request", obj({"method": {"enum": ["GET", "POST"]},
                             "path": {"type": "string", "pattern": "^/[a-z]{1,8}$"},
                             "status": {"type": "integer", "minimum": 100, "maximum": 599}})),
    ("a nested settings object",
     obj({"settings": obj({"theme": {"enum": ["dark", "light"]}, "font": obj({"size": {
         "type": "integer", "minimum": 8, "maximum": 32}, "bold": {"type": "boolean"}})})})),
    ("a one-of shape",
     obj({"shape": {"oneOf": [obj({"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 9}}),
                              obj({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                          "maximum": 9}})]}})),
    ("tags and a count", obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                              "count": {"type": "integer", "minimum": 0, "maximum": 3}})),
    ("a translation pair", obj({"english": S, "french": S})),
    ("a math answer with steps",
     obj({"steps": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 2},
          "answer": {"type": "integer", "minimum": -100, "maximum": 100}})),
    ("an optional nickname", obj({"name": SHORT, "nickname": SHORT}, required=["name"])),
    ("a percentage", obj({"percent": {"type": "number", "minimum": 0, "maximum": 100}})),
]
