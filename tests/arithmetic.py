"""An independent reader of DigitMath's arithmetic, for tests that check the generated steps."""


def value(expression: str) -> int:
    """'54', '300 + 24' or '356 - 7' as a number."""
    words = expression.split(" ")
    if len(words) == 1:
        return int(words[0])
    a, op, b = words
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
