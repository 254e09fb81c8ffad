"""Laying a compile out as the worker will run it: from the files and
arguments an input mode found (local paths) to an ActionSpec (paths in the
input root).

Project files are sent at their paths relative to the input root, the deepest
directory holding the working directory, the outputs and all of them, so that
another checkout of the tree builds the same action. System files stay on the
machines: the manifest lists them for the worker to check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from reapi.conventions import MANIFEST_VARIABLE, SANDBOX_ROOT
from shim.action import ActionSpec
from shim.inputs import DigestCache, input_root, is_system
from shim.manifest import MANIFEST, Manifests, digest_status
from shim.modes import Compile, Inputs

# Passed to the remote compile so it behaves as the local one would.
PASSED_ENVIRONMENT = ("LANG", "LC_ALL", "LC_MESSAGES", "LC_CTYPE", "SOURCE_DATE_EPOCH")
REMOTE_PATH = "/usr/local/bin:/usr/bin:/bin"


def passed_environment(env: Mapping[str, str]) -> dict[str, str]:
    """What of the client's environment reaches the remote compile."""
    return {name: env[name] for name in PASSED_ENVIRONMENT if name in env}


def lay_out(
    compile: Compile, inputs: Inputs, digests: DigestCache, manifests: Manifests
) -> ActionSpec:
    cwd = compile.cwd
    project: list[str] = []
    system: list[str] = []
    for path in inputs.read:
        (system if is_system(path) else project).append(path)
    generated = {os.path.normpath(path): data for path, data in inputs.generated.items()}
    outputs = [os.path.join(cwd, output) for output in inputs.outputs]
    root = input_root(cwd, [*project, *generated, *outputs])
    inside = root.rstrip("/") + "/"
    files = {}
    dated = False
    for path in project:
        info = digests.info(path, digest_status(inputs.statuses.get(path)))
        # Under the root by its choice: relpath's work is not needed.
        files[path[len(inside) :]] = (info.digest, False)
        dated = dated or info.uses_date_time
    arguments = list(inputs.arguments)
    if compile.debug:
        # Debug info names the compile's directory: make it this machine's.
        arguments.append(f"-fdebug-prefix-map={SANDBOX_ROOT}={root}")
    manifest = manifests.manifest(
        compile.compiler, system, [p for p in inputs.absent if is_system(p)], inputs.statuses
    )
    contents = {path[len(inside) :]: data for path, data in generated.items()}
    contents[MANIFEST] = manifest
    relative = os.path.relpath(cwd, root)
    return ActionSpec(
        arguments=[compile.compiler, *arguments],
        files=files,
        contents=contents,
        workdir="" if relative == "." else relative,
        outputs=list(inputs.outputs),
        environment={
            "PATH": REMOTE_PATH,
            MANIFEST_VARIABLE: MANIFEST,
            **passed_environment(compile.env),
        },
        # __DATE__ and __TIME__ change every build unless SOURCE_DATE_EPOCH pins them.
        do_not_cache=dated and "SOURCE_DATE_EPOCH" not in compile.env,
    )
