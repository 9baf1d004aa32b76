"""real_text.stdlib_text: deterministic real text from the interpreter's standard library."""

from real_text import stdlib_text


def test_stdlib_text_is_long_enough_deterministic_and_real():
    text = stdlib_text(50_000)
    assert len(text) >= 50_000
    assert text == stdlib_text(50_000)
    assert "def " in text and "import " in text
    assert stdlib_text(10).startswith(text[:10])  # the same files in the same order
