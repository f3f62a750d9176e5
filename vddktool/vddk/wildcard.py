"""export=WILDCARD matching, with fnmatch(3) rules.

Python's fnmatch module has no escapes, but remote file names always start
with "[datastore]", so users must be able to write ``\\[`` and ``\\]``.
Here a backslash makes the next character literal, ``*`` and ``?`` match
any characters including "/", and ``[...]`` is a character class
(``[!...]`` or ``[^...]`` negated).
"""

import re


def _translate_class(pattern, i):
    """Regex for the class starting after '[' at index i, and the index
    after its ']'; None if the class is not closed (then '[' is literal)."""
    j = i
    negate = j < len(pattern) and pattern[j] in "!^"
    if negate:
        j += 1
    members = []
    first = True
    while j < len(pattern):
        char = pattern[j]
        if char == "]" and not first:
            body = "".join(members)
            return ("[^%s]" % body if negate else "[%s]" % body), j + 1
        if char == "\\" and j + 1 < len(pattern):
            j += 1
            char = pattern[j]
            members.append(re.escape(char))
        elif char == "-" and members and j + 1 < len(pattern) \
                and pattern[j + 1] != "]":
            members.append("-")
        else:
            members.append(re.escape(char) if char != "-" else "\\-")
        first = False
        j += 1
    return None


def compile_wildcard(pattern):
    parts = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        i += 1
        if char == "\\" and i < len(pattern):
            parts.append(re.escape(pattern[i]))
            i += 1
        elif char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == "[":
            translated = _translate_class(pattern, i)
            if translated is None:
                parts.append(re.escape(char))
            else:
                regex, i = translated
                parts.append(regex)
        else:
            parts.append(re.escape(char))
    return re.compile("(?s)^%s$" % "".join(parts))


def wildcard_matches(pattern, name):
    return compile_wildcard(pattern).match(name) is not None


def climbs_out(name):
    """Whether a client's export name has a ".." path component: ``*``
    matches it like any text, so without this check "[ds] vm/*" would
    open "[ds] vm/../other/other.vmdk" too."""
    return ".." in re.split(r"[/\\\]\s]+", name)
