"""classify() over real command lines, and the option table's own sanity."""

from __future__ import annotations

import shlex

import pytest

from shim.classify import (
    Local,
    RemoteCompile,
    classify,
    compile_only_arguments,
    expand_response_files,
)
from shim.inputs import dependency_query, preprocess_query
from shim.options import OPTIONS, Kind, lookup

KERNEL = (
    "-Wp,-MMD,drivers/net/.dummy.o.d -nostdinc -I./arch/x86/include "
    "-I./arch/x86/include/generated -I./include -include ./include/linux/kconfig.h "
    "-D__KERNEL__ -fmacro-prefix-map=./= -Wall -Wundef -std=gnu11 -O2 -mno-sse "
    "-fno-stack-protector -DKBUILD_MODNAME='\"dummy\"' -c -o drivers/net/dummy.o "
    "drivers/net/dummy.c"
)
AUTOMAKE = "-DHAVE_CONFIG_H -I. -I..  -g -O2 -MT jv.o -MD -MP -MF .deps/jv.Tpo -c -o jv.o jv.c"
CMAKE = (
    "-DYAML_VERSION_MAJOR=0 -I/src/include -O3 -DNDEBUG -std=gnu99 -MD "
    "-MT CMakeFiles/yaml.dir/src/api.c.o -MF CMakeFiles/yaml.dir/src/api.c.o.d "
    "-o CMakeFiles/yaml.dir/src/api.c.o -c /src/src/api.c"
)


@pytest.mark.parametrize(
    ("command", "source", "output", "language", "dependency_file", "extra"),
    [
        (KERNEL, "drivers/net/dummy.c", "drivers/net/dummy.o", "c", "drivers/net/.dummy.o.d", ()),
        (AUTOMAKE, "jv.c", "jv.o", "c", ".deps/jv.Tpo", ()),
        (
            CMAKE,
            "/src/src/api.c",
            "CMakeFiles/yaml.dir/src/api.c.o",
            "c",
            "CMakeFiles/yaml.dir/src/api.c.o.d",
            (),
        ),
        ("-c -g -O2 conftest.c", "conftest.c", "conftest.o", "c", None, ()),
        ("-c src/lib/util.c", "src/lib/util.c", "util.o", "c", None, ()),
        ("-O2 -MMD -c a.c -o build/a.o", "a.c", "build/a.o", "c", "build/a.d", ()),
        ("-S -O2 kernel.c", "kernel.c", "kernel.s", "c", None, ()),
        ("-x c++ -c table.inc -o table.o", "table.inc", "table.o", "c++", None, ()),
        ("-xc -c weird.txt", "weird.txt", "weird.o", "c", None, ()),
        ("-std=c++17 -fPIC -c engine.cpp -o engine.o", "engine.cpp", "engine.o", "c++", None, ()),
        ("-gsplit-dwarf -c a.c -o out/a.o", "a.c", "out/a.o", "c", None, ("out/a.dwo",)),
        ("-c start.S -o start.o", "start.S", "start.o", "assembler-with-cpp", None, ()),
        ("-isystem /opt/include -include config.h -c m.cc", "m.cc", "m.o", "c++", None, ()),
        ("-c -o lib.o lib.c -Wl,-z,defs -pthread", "lib.c", "lib.o", "c", None, ()),
    ],
)
def test_remote_compiles(
    command: str,
    source: str,
    output: str,
    language: str,
    dependency_file: str | None,
    extra: tuple[str, ...],
) -> None:
    decision = classify(shlex.split(command))
    assert isinstance(decision, RemoteCompile), decision
    assert (decision.source, decision.output, decision.language) == (source, output, language)
    assert decision.dependency_file == dependency_file
    assert decision.extra_outputs == extra


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ("-o conftest -g -O2 conftest.c", "link"),
        ("main.o util.o -o app -lm", "link"),
        ("-E conftest.c", "preprocess-only"),
        ("-M foo.c", "dependencies-only"),
        ("-MM foo.c", "dependencies-only"),
        ("-c a.c b.c", "multiple-sources"),
        ("-x c -c -", "stdin-source"),
        ("-c", "no-source"),
        ("-march=native -O2 -c a.c", "native-arch"),
        ("-mtune=native -c a.c", "native-arch"),
        ("-fprofile-use=prof -c a.c", "profile-use"),
        ("-fprofile-use -c a.c", "profile-use"),
        ("-save-temps -c a.c", "save-temps"),
        ("-save-temps=obj -c a.c", "save-temps"),
        ("-v -c a.c", "verbose"),
        ("--version", "unknown-option"),
        ("-V", "unknown-option"),
        ("-qversion", "unknown-option"),
        ("-rdynamic main.o -o app", "link"),
        ("-rdynamic -c a.c", "unknown-option"),
        ("-c foo.m", "unsupported-language"),
        ("-c data.bin", "unsupported-language"),
        ("-c a.c -o", "missing-option-value"),
        ("-Xpreprocessor -foo -c a.c", "preprocessor-passthrough"),
        ("-Wp,-DFOO -c a.c", "preprocessor-passthrough"),
        ("-B /opt/gcc/bin -c a.c", "tool-search-path"),
        ("-fplugin=./p.so -c a.c", "compiler-plugin"),
        ("-fdump-tree-all -c a.c", "dump-files"),
        ("-print-file-name=libc.so", "query"),
        ("-dumpmachine", "query"),
        ("-MG -MD -c a.c", "missing-headers-allowed"),
        ("-specs=my.specs -c a.c", "specs-file"),
        ("@unexpanded.rsp", "response-file"),
        ("--coverage -c a.c -o a.o", "coverage"),
        ("-ftest-coverage -fprofile-arcs -c a.c", "coverage"),
        ("-fprofile-generate -c a.c", "profile-generate"),
    ],
)
def test_local_decisions(command: str, reason: str) -> None:
    assert classify(shlex.split(command)) == Local(reason)


def test_preprocessor_arguments_are_kept_in_order() -> None:
    decision = classify(
        shlex.split(
            "-I inc -Iother -DX=1 -O2 -U Y -include cfg.h -isystem /sys -std=c11 -Wall -c a.c"
        )
    )
    assert isinstance(decision, RemoteCompile)
    assert decision.preprocessor_arguments == (
        "-I",
        "inc",
        "-Iother",
        "-DX=1",
        "-U",
        "Y",
        "-include",
        "cfg.h",
        "-isystem",
        "/sys",
        "-std=c11",
    )


def test_kernel_dependency_flag_is_not_a_preprocessor_argument() -> None:
    decision = classify(shlex.split(KERNEL))
    assert isinstance(decision, RemoteCompile)
    assert not any(a.startswith("-Wp,") for a in decision.preprocessor_arguments)
    assert "-D__KERNEL__" in decision.preprocessor_arguments


def test_response_files_are_expanded_recursively() -> None:
    files = {"a.rsp": '-O2 "-DNAME=two words" @b.rsp', "b.rsp": "-c main.c"}
    expanded = expand_response_files(["@a.rsp", "-o", "main.o"], files.get)
    assert expanded == ["-O2", "-DNAME=two words", "-c", "main.c", "-o", "main.o"]
    assert expand_response_files(["@missing.rsp"], files.get) == ["@missing.rsp"]
    assert isinstance(classify(expanded), RemoteCompile)


def test_option_table_is_sorted_and_sane() -> None:
    names = [option.name for option in OPTIONS]
    assert names == sorted(names), "keep OPTIONS sorted by name"
    assert len(names) == len(set(names)), "each option once"
    for option in OPTIONS:
        assert option.name.startswith("-")
        assert bool(option.reason) == bool(option.kind & Kind.LOCAL), option
        if option.kind & Kind.PATH:
            assert option.kind & Kind.SEPARATE or option.prefix, option


@pytest.mark.parametrize(
    ("argument", "name", "value"),
    [
        ("-MMD", "-MMD", None),
        ("-MD", "-MD", None),
        ("-MFdeps.d", "-MF", "deps.d"),
        ("-Iinclude", "-I", "include"),
        ("-isystem/x", "-isystem", "/x"),
        ("-O", "-O", None),
        ("-O3", "-O", "3"),
        ("--sysroot=/sr", "--sysroot", "/sr"),
        ("-include", "-include", None),
    ],
)
def test_lookup_takes_the_longest_match(argument: str, name: str, value: str | None) -> None:
    option, found = lookup(argument)
    assert option is not None and (option.name, found) == (name, value)


def test_compile_only_arguments_drop_preprocessing() -> None:
    arguments = shlex.split(
        "-std=gnu99 -ansi -I inc -Iother -DX=1 -include cfg.h -O2 -MMD -MF a.d -MT a.o "
        "-Wp,-MD,k.d -x c -Wall -c src/a.c -o a.o"
    )
    assert compile_only_arguments(arguments) == [
        "-std=gnu99",
        "-ansi",
        "-O2",
        "-Wall",
        "-c",
        "-o",
        "a.o",
    ]


def test_preprocess_query_keeps_the_dependency_file_names() -> None:
    query = preprocess_query(
        "gcc", shlex.split("-Iinc -MMD -c src/a.c -o obj/a.o"), "obj/a.o", "obj/a.d"
    )
    assert query == [
        "gcc",
        "-Iinc",
        "-MMD",
        "src/a.c",
        "-MF",
        "obj/a.d",
        "-MT",
        "obj/a.o",
        "-E",
        "-o",
        "-",
    ]
    kernel = preprocess_query("gcc", shlex.split("-Wp,-MMD,.a.o.d -c a.c -o a.o"), "a.o", ".a.o.d")
    assert kernel == ["gcc", "-Wp,-MMD,.a.o.d", "a.c", "-E", "-o", "-"]


def test_dependency_query_removes_outputs() -> None:
    assert dependency_query("gcc", shlex.split("-Iinc -MMD -MF a.d -MT x -c a.c -o a.o")) == [
        "gcc",
        "-Iinc",
        "a.c",
        "-M",
    ]
