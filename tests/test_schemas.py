"""The generated JSON Schemas are a function of the code alone, not of a library's formatting."""

from flowactors import schemas


def test_schema_descriptions_do_not_depend_on_how_msgspec_indents_docstrings() -> None:
    """msgspec 0.23 dedents a docstring in a schema's description and 0.19 does not: the file
    written from either is the same."""
    as_0_19 = {"description": "Why it exists.\n\n    More detail,\n    on two lines.\n    ",
               "properties": {"a": {"description": "One line."}}}
    as_0_23 = {"description": "Why it exists.\n\nMore detail,\non two lines.",
               "properties": {"a": {"description": "One line."}}}
    assert schemas._render(as_0_19) == schemas._render(as_0_23)

