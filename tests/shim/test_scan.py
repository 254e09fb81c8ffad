"""The `scan` mode include scanner: what it reads from a file, how it resolves
names against gcc's real search path, where it gives up, and that what it
finds covers everything gcc's own `-M` lists."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

import shim.scan
from shim.scan import (
    Include,
    Probed,
    Scanner,
    ScanUncertain,
    SearchPath,
    parse_includes,
    parse_search_list,
    search_arguments,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'#include "a.h"\n', [Include("a.h", angle=False)]),
        (b"#include <stdio.h>\n", [Include("stdio.h", angle=True)]),
        (b"  #  include\t<sys/types.h>  // why\n", [Include("sys/types.h", angle=True)]),
        (b"#include_next <limits.h>\n", [Include("limits.h", angle=True, next=True)]),
        (b'#import "objc.h"\n', [Include("objc.h", angle=False)]),
        (b'%:include "digraph.h"\n', [Include("digraph.h", angle=False)]),
        (b'/* lead */ #include "after-comment.h"\n', [Include("after-comment.h", angle=False)]),
        (b'#inc\\\nlude "spliced.h"\n', [Include("spliced.h", angle=False)]),
        (b'#include /* odd */ "commented.h"\n', [Include("commented.h", angle=False)]),
        # Inside comments and strings nothing is a directive.
        (b"/* the #include's of old\n #include <not-me.h>\n*/\n", []),
        (b'// #include "nor-me.h"\n', []),
        (b'const char *s = "#include <str.h>";\n', []),
        (b'const char *s = "/*"; \n#include "real.h"\n', [Include("real.h", angle=False)]),
        # Every branch is taken: a superset of what one configuration reads.
        (
            b'#ifdef _WIN32\n#include <windows.h>\n#else\n#include "posix.h"\n#endif\n',
            [Include("windows.h", angle=True), Include("posix.h", angle=False)],
        ),
        (
            b"#if __has_include(<zstd.h>)\n#include <zstd.h>\n#endif\n",
            [Include("zstd.h", angle=True), Include("zstd.h", angle=True, probe=True)],
        ),
        (b"#define include_me 1\nint include;\n", []),
    ],
)
def test_parse_includes(text: bytes, expected: list[Include]) -> None:
    assert sorted(parse_includes(text).includes, key=repr) == sorted(expected, key=repr)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"#include FT_FREETYPE_H(x)\n", "scan-computed-include"),
        (b"#include PREFIX SUFFIX\n", "scan-computed-include"),
        (b"#if __has_include(HEADER)\n#endif\n", "scan-computed-include"),
        (b'static const char d[] = {\n#embed "data.bin"\n};\n', "scan-embed"),
    ],
)
def test_uncertain_files(text: bytes, reason: str) -> None:
    with pytest.raises(ScanUncertain, match=reason):
        parse_includes(text)


def test_search_arguments() -> None:
    found = search_arguments(
        ["-O2", "-Iinc", "-I", "other", "-DX=1", "-isystem", "sys", "-include", "cfg.h",
         "-m32", "-c", "a.c", "-imacros", "m.h", "-iquote", "q", "-nostdinc", "-D", "Y",
         '-DH="h.h"', "-DZ", "-UZ"]
    )  # fmt: skip
    assert found.search == (
        "-Iinc", "-I", "other", "-isystem", "sys", "-m32", "-iquote", "q", "-nostdinc",
    )  # fmt: skip
    assert found.forced == ("cfg.h", "m.h")
    assert found.defines == {"X": "1", "Y": "1", "H": '"h.h"'}
    with pytest.raises(ScanUncertain, match="scan-split-include-path"):
        search_arguments(["-Ia", "-I-", "-Ib", "-c", "x.c"])


def test_parse_search_list() -> None:
    text = (
        'ignoring nonexistent directory "missing"\n'
        '#include "..." search starts here:\n quoted\n'
        "#include <...> search starts here:\n inc\n /usr/include\nEnd of search list.\n"
    )
    assert parse_search_list(text, "/p") == SearchPath(
        ("/p/quoted",), ("/p/inc", "/usr/include"), ("/p/missing",)
    )
    with pytest.raises(ScanUncertain):
        parse_search_list("no list here\n", "/p")


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def age(root: Path) -> None:
    """Make every file and directory old enough for its scan to be kept."""
    old = time.time() - 60
    for path in [root, *root.rglob("*")]:
        os.utime(path, (old, old))


def scan(scanner: Scanner, root: Path, arguments: list[str]) -> tuple[set[str], list[str]]:
    found_arguments = search_arguments(arguments)
    path = asyncio.run(
        scanner.search_path("gcc", "c", found_arguments.search, str(root), dict(os.environ))
    )
    source = next(a for a in arguments if a.endswith(".c"))
    found = scanner.scan(str(root), source, found_arguments, path)
    return {os.path.relpath(f, root) for f in found.files if f.startswith(str(root))}, found.absent


def gcc_reads(root: Path, arguments: list[str]) -> set[str]:
    out = subprocess.run(
        ["gcc", *arguments, "-M"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    paths = out.replace("\\\n", " ").split(":", 1)[1].split()
    return {os.path.relpath(os.path.join(root, p), root) for p in paths if not p.startswith("/")}


PROJECT = {
    "src/main.c": '#include "local.h"\n#include <lib.h>\n#include "sub/deep.h"\n'
    "#include <stdio.h>\nint main(void) { return 0; }\n",
    "src/local.h": '#include "sibling.h"\n',
    "src/sibling.h": "\n",
    "src/sub/deep.h": '#include "deeper.h"\n',
    "src/sub/deeper.h": "\n",
    "include/lib.h": "#include_next <lib.h>\n",
    "vendor/lib.h": '#include "vendor-only.h"\n',
    "vendor/vendor-only.h": "\n",
    "include/forced.h": "\n",
}
ARGUMENTS = ["-Iinclude", "-Ivendor", "-include", "include/forced.h", "-c", "src/main.c"]


def test_scan_finds_what_gcc_reads(tmp_path: Path) -> None:
    write(tmp_path, PROJECT)
    found, _absent = scan(Scanner(), tmp_path, ARGUMENTS)
    assert gcc_reads(tmp_path, ARGUMENTS) <= found
    assert found == {
        "src/main.c", "src/local.h", "src/sibling.h", "src/sub/deep.h", "src/sub/deeper.h",
        "include/lib.h", "vendor/lib.h", "vendor/vendor-only.h", "include/forced.h",
    }  # fmt: skip


def search_chain(root: Path, arguments: list[str]) -> tuple[str, ...]:
    found = search_arguments(arguments).search
    path = asyncio.run(Scanner().search_path("gcc", "c", found, str(root), dict(os.environ)))
    return path.bracket


def test_missing_names_are_reported_absent_everywhere_they_were_sought(tmp_path: Path) -> None:
    write(tmp_path, {"a.c": "#ifdef _WIN32\n#include <windows.h>\n#endif\n"})
    _found, absent = scan(Scanner(), tmp_path, ["-c", "a.c"])
    chain = search_chain(tmp_path, ["-c", "a.c"])
    assert "/usr/include" in chain
    assert {p for p in absent if p.endswith("/windows.h")} == {f"{d}/windows.h" for d in chain}


def test_places_tried_before_the_one_found_are_absent(tmp_path: Path) -> None:
    """A worker with a file there would read it instead (a newer library in
    /usr/local/include, say): the compile must not run there."""
    write(tmp_path, {"a.c": "#include <lib.h>\n#include <stdio.h>\n", "second/lib.h": "\n"})
    (tmp_path / "first").mkdir()
    arguments = ["-Ifirst", "-Isecond", "-c", "a.c"]
    found, absent = scan(Scanner(), tmp_path, arguments)
    assert "second/lib.h" in found
    assert str(tmp_path / "first/lib.h") in absent
    assert str(tmp_path / "second/lib.h") not in absent
    chain = search_chain(tmp_path, arguments)
    before = chain[: chain.index("/usr/include")]  # stdio.h is found in /usr/include
    assert {f"{d}/stdio.h" for d in before} <= set(absent)
    assert "/usr/include/stdio.h" not in absent


def test_headers_are_read_once_across_compiles(tmp_path: Path) -> None:
    files = {f"f{i}.c": '#include "common.h"\n#include <stdio.h>\n' for i in range(20)}
    write(tmp_path, files | {"common.h": "#include <stdlib.h>\n"})
    age(tmp_path)
    scanner = Scanner()
    scan(scanner, tmp_path, ["-c", "f0.c"])
    first = scanner.files_parsed
    for i in range(1, 20):
        scan(scanner, tmp_path, ["-c", f"f{i}.c"])
    assert scanner.files_parsed == first + 19  # each new source; no header twice


def test_a_new_header_that_shadows_an_old_one_is_seen(tmp_path: Path) -> None:
    """A lookup is remembered only while the directories it searched are unchanged."""
    write(tmp_path, {"a.c": "#include <lib.h>\n", "second/lib.h": "\n"})
    (tmp_path / "first").mkdir()
    age(tmp_path)
    scanner = Scanner()
    arguments = ["-Ifirst", "-Isecond", "-c", "a.c"]
    assert "second/lib.h" in scan(scanner, tmp_path, arguments)[0]
    write(tmp_path, {"first/lib.h": "\n"})
    found, _ = scan(scanner, tmp_path, arguments)
    assert "first/lib.h" in found and "second/lib.h" not in found
    assert found >= gcc_reads(tmp_path, arguments)


def test_an_include_directory_that_appears_later_is_searched(tmp_path: Path) -> None:
    write(tmp_path, {"a.c": "#include <gen.h>\n", "fallback/gen.h": "\n"})
    age(tmp_path)
    scanner = Scanner()
    arguments = ["-Igenerated", "-Ifallback", "-c", "a.c"]
    assert "fallback/gen.h" in scan(scanner, tmp_path, arguments)[0]
    write(tmp_path, {"generated/gen.h": "\n"})
    assert "generated/gen.h" in scan(scanner, tmp_path, arguments)[0]


def test_an_edited_file_is_read_again(tmp_path: Path) -> None:
    write(tmp_path, {"a.c": '#include "a.h"\n', "a.h": "\n", "b.h": "\n"})
    age(tmp_path)
    scanner = Scanner()
    assert "b.h" not in scan(scanner, tmp_path, ["-c", "a.c"])[0]
    (tmp_path / "a.h").write_text('#include "b.h"\n')
    assert "b.h" in scan(scanner, tmp_path, ["-c", "a.c"])[0]


def test_a_macro_include_defined_in_a_file_gives_up(tmp_path: Path) -> None:
    write(tmp_path, {"a.c": '#include "a.h"\n', "a.h": "#define H <stdio.h>\n#include H\n"})
    with pytest.raises(ScanUncertain, match="scan-computed-include"):
        scan(Scanner(), tmp_path, ["-c", "a.c"])


def test_a_macro_include_follows_the_command_line(tmp_path: Path) -> None:
    """git's sha1dc: `#include SHA1DC_CUSTOM_INCLUDE_SHA1_C` given by -D, and an
    `#ifdef`-guarded macro include that nothing defines (so never reached)."""
    write(
        tmp_path,
        {
            "sha1.c": '#ifdef CUSTOM_C\n#include CUSTOM_C\n#endif\n#include "sha1.h"\n',
            "sha1.h": "#ifdef TRAILER_H\n#include TRAILER_H\n#endif\n",
            "cache.h": "#include <stdlib.h>\n",
        },
    )
    arguments = ['-DCUSTOM_C="cache.h"', "-c", "sha1.c"]
    found, _ = scan(Scanner(), tmp_path, arguments)
    assert found == {"sha1.c", "sha1.h", "cache.h"} >= gcc_reads(tmp_path, arguments)
    defined_badly = ["-DCUSTOM_C=OTHER_MACRO", "-c", "sha1.c"]
    with pytest.raises(ScanUncertain, match="scan-computed-include"):
        scan(Scanner(), tmp_path, defined_badly)


DEEP = {
    "a.c": '#include "top.h"\n',
    "b.c": '#include "top.h"\n',
    "top.h": '#include "mid.h"\n',
    "mid.h": '#include "leaf.h"\n#include <lib.h>\n#ifdef TRAILER\n#include TRAILER\n#endif\n',
    "leaf.h": "\n",
    "second/lib.h": "\n",
    "extra.h": "\n",
    "other.h": "\n",
}


def settled(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files old enough for closures to be kept: `age` cannot set the change
    time, so the racy window shrinks to 50 ms and the test waits it out."""
    age(root)
    monkeypatch.setattr(shim.scan, "RACY_NS", 50_000_000)
    time.sleep(0.1)


def test_kept_closures_see_changes_deep_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """top.h's closure is kept after the first compiles; an edit two levels
    down, and a header that now shadows one found deep inside, are both seen."""
    write(tmp_path, DEEP)
    (tmp_path / "first").mkdir()
    settled(tmp_path, monkeypatch)
    scanner = Scanner()
    arguments = ["-Ifirst", "-Isecond", "-c"]
    assert scan(scanner, tmp_path, [*arguments, "a.c"])[0] == {
        "a.c", "top.h", "mid.h", "leaf.h", "second/lib.h",
    }  # fmt: skip
    parsed = scanner.files_parsed
    scan(scanner, tmp_path, [*arguments, "b.c"])
    assert scanner.files_parsed == parsed + 1  # b.c alone: top.h's closure was taken whole
    write(tmp_path, {"first/lib.h": "\n"})
    found, _ = scan(scanner, tmp_path, [*arguments, "a.c"])
    assert "first/lib.h" in found and "second/lib.h" not in found
    assert found >= gcc_reads(tmp_path, [*arguments, "a.c"])
    (tmp_path / "leaf.h").write_text('#include "extra.h"\n')
    assert "extra.h" in scan(scanner, tmp_path, [*arguments, "b.c"])[0]


def test_a_macro_include_in_a_kept_closure_follows_each_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, DEEP)
    settled(tmp_path, monkeypatch)
    scanner = Scanner()
    assert "other.h" not in scan(scanner, tmp_path, ["-Isecond", "-c", "a.c"])[0]
    with_trailer = ['-DTRAILER="other.h"', "-Isecond", "-c", "b.c"]
    found, _ = scan(scanner, tmp_path, with_trailer)
    assert "other.h" in found and found >= gcc_reads(tmp_path, with_trailer)
    assert "other.h" not in scan(scanner, tmp_path, ["-Isecond", "-c", "a.c"])[0]


def test_a_long_include_chain_changed_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 headers, each including the next: when the last one changes, every
    closure on the chain is walked again, nested no deeper than MAX_NESTING."""
    chain = {f"h{i}.h": f'#include "h{i + 1}.h"\n' for i in range(600)}
    sources = {"a.c": '#include "h0.h"\n', "b.c": '#include "h0.h"\n'}
    write(tmp_path, chain | sources | {"h600.h": "\n"})
    settled(tmp_path, monkeypatch)
    scanner = Scanner()
    assert len(scan(scanner, tmp_path, ["-c", "a.c"])[0]) == 602
    (tmp_path / "h600.h").write_text('#include "end.h"\n')
    (tmp_path / "end.h").write_text("\n")
    assert "end.h" in scan(scanner, tmp_path, ["-c", "b.c"])[0]


@pytest.mark.parametrize(
    "text",
    [
        'const char *s = R"(a\n /* b)";\n#include "hidden.h"\nint x; // */\n',
        'auto s = u8R"xy(a /* b)xy";\n',
        'auto s = R"(never closed\n',
    ],
    ids=["spans-lines", "comment-start-inside", "open"],
)
def test_a_raw_string_that_could_hide_a_directive_is_uncertain(text: str) -> None:
    """gcc reads raw strings in C++ and GNU C (so the first text includes
    hidden.h) but not in strict C: a scan cannot tell which the compile is."""
    with pytest.raises(ScanUncertain, match="scan-raw-string"):
        parse_includes(text.encode())


def test_a_plain_raw_string_reads_the_same_either_way() -> None:
    text = b'const char *s = R"(abc)";\nconst char *t = FOOR"(x\n";\n#include <x.h>\n'
    assert [i.name for i in parse_includes(text).includes] == ["x.h"]


def test_include_next_in_a_file_included_by_its_own_path_is_a_plain_include(
    tmp_path: Path,
) -> None:
    """gcc has no place in the chain to go on from: `#include_next "lib.h"`
    looks beside the file first, as `#include "lib.h"` would."""
    write(tmp_path, {"w/wrap.h": '#include_next "lib.h"\n', "w/lib.h": "\n", "inc/lib.h": "\n"})
    write(tmp_path, {"a.c": f'#include "{tmp_path}/w/wrap.h"\n'})
    arguments = ["-Iinc", "-c", "a.c"]
    found, _absent = scan(Scanner(), tmp_path, arguments)
    assert gcc_reads(tmp_path, arguments) <= found
    assert "w/lib.h" in found


@pytest.mark.parametrize(
    "text, name",
    [
        (b'/* a *\\ \n/\n#include "x.h"\n/* b */\n', "x.h"),  # "*", splice, "/" ends it
        (b"#inc\\\t\nlude <x.h>\n", "x.h"),
        (b'#inc\\\r\nlude "x.h"\r\n', "x.h"),
    ],
    ids=["comment-end", "directive", "crlf"],
)
def test_lines_are_spliced_as_gcc_splices_them(text: bytes, name: str) -> None:
    """A backslash, blanks, then the line's end: gcc splices there too."""
    assert [i.name for i in parse_includes(text).includes] == [name]


@pytest.mark.parametrize(
    "text",
    [b'??=include "x.h"\n', b'// a ??/\n#include "x.h"\n', b'char *s = "??/";\n'],
    ids=["directive", "splice", "quote"],
)
def test_trigraphs_that_could_change_a_directive_are_uncertain(text: bytes) -> None:
    """Where trigraphs are on (strict C modes), these make, hide or show one."""
    with pytest.raises(ScanUncertain, match="scan-trigraph"):
        parse_includes(text)


def test_other_trigraphs_read_the_same_either_way() -> None:
    text = b'/* .git/objects/??/?{38} */\nint a ??( 2 ??) = ??< 0 ??>;\n#include "x.h"\n'
    assert [i.name for i in parse_includes(text).includes] == ["x.h"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'#define HAVE_X __has_include("x.h")\n', "scan-probe-in-macro"),
        (b"#  define HAVE_X \\\n  __has_include_next(<x.h>)\n", "scan-probe-in-macro"),
    ],
)
def test_a_probe_looked_up_where_its_macro_expands_is_uncertain(text: bytes, reason: str) -> None:
    with pytest.raises(ScanUncertain, match=reason):
        parse_includes(text)


def test_an_angle_probe_in_a_macro_is_the_same_everywhere() -> None:
    parsed = parse_includes(b"#define USE_TBB __has_include(<tbb/tbb.h>)\n")
    assert parsed.includes == (Include("tbb/tbb.h", angle=True, probe=True),)


def probes_of(root: Path, files: list[str], arguments: list[str]) -> Probed:
    scanner = Scanner()
    found = search_arguments(arguments)
    path = asyncio.run(scanner.search_path("gcc", "c", found.search, str(root), dict(os.environ)))
    return scanner.probes(((str(root / f), None) for f in files), path, found)


def test_probes_are_looked_up_as_gcc_does(tmp_path: Path) -> None:
    """What `gcc -M` leaves out: a probed project file, beside the prober or
    on the search path, and every place a probe found empty."""
    write(
        tmp_path,
        {
            "src/a.c": '#if __has_include("sub/extra.h") && __has_include(<lib.h>)\n#endif\n'
            "#if __has_include(<nowhere.h>)\n#endif\n",
            "src/sub/extra.h": "\n",
            "inc/lib.h": "\n",
        },
    )
    probed = probes_of(tmp_path, ["src/a.c"], ["-Iinc", "-c", "src/a.c"])
    assert sorted(probed.found) == [
        (str(tmp_path / "inc"), "lib.h", str(tmp_path / "inc/lib.h")),
        (str(tmp_path / "src"), "sub/extra.h", str(tmp_path / "src/sub/extra.h")),
    ]
    chain = search_chain(tmp_path, ["-Iinc", "-c", "src/a.c"])
    assert {f"{d}/nowhere.h" for d in chain} <= set(probed.absent)
    assert "/usr/include/nowhere.h" in probed.absent
    # gcc agrees: the probed files are not in its list, so they must be added.
    assert "src/sub/extra.h" not in gcc_reads(tmp_path, ["-Iinc", "-c", "src/a.c"])


@pytest.mark.parametrize(
    ("files", "arguments", "reason"),
    [
        ({"a.c": "#define N <x.h>\n#if __has_include(N)\n#endif\n"}, [], "probe-uncertain"),
        ({"a.c": "#if __has_include_next(<x.h>)\n#endif\n"}, [], "probe-next"),
        ({"a.c": "int a;\n"}, ["-DHAS=__has_include(<x.h>)"], "probe-in-option"),
        (
            {"a.c": 'const char *s = R"(\n#x)";\n#if __has_include("y.h")\n#endif\n'},
            [],
            "probe-uncertain",
        ),
    ],
)
def test_probes_that_cannot_be_read_from_the_text_are_uncertain(
    tmp_path: Path, files: dict[str, str], arguments: list[str], reason: str
) -> None:
    write(tmp_path, files)
    with pytest.raises(ScanUncertain, match=reason):
        probes_of(tmp_path, list(files), [*arguments, "-c", "a.c"])


def test_a_file_the_parser_gives_up_on_without_probes_has_none(tmp_path: Path) -> None:
    write(tmp_path, {"a.c": 'const char *s = R"(\n#x)";\n'})
    probed = probes_of(tmp_path, ["a.c"], ["-c", "a.c"])
    assert probed.found == [] and probed.absent == []
