"""JVM options for TorchServe's frontend: split as their reader splits them, judged by an allowlist.

Two readers hand options to the JVM, and each splits differently:

* `vmargs` in config.properties: TorchServe's Python launcher calls `str.split()` with no
  argument, which breaks on every Unicode whitespace (U+2028, U+3000, U+0085, `\\x1c`..`\\x1f`,
  ...), so `-Xmx1g<U+2028>-javaagent:/tmp/a.jar` is two arguments to the JVM;
* `JAVA_TOOL_OPTIONS`, `JDK_JAVA_OPTIONS` and `_JAVA_OPTIONS` in the environment: the JVM (or
  the `java` launcher) splits on C `isspace` characters and honours quotes; `JDK_JAVA_OPTIONS`
  also expands `@argfile`.

Whatever the splitting, each resulting argument must be a heap or GC size or a GC choice from
`ALLOWED`; anything else (`-javaagent`, `-agentlib`, `@argfile`, `-XX:VMOptionsFile=`,
`--patch-module`, `-D...`, a bare class name, a quote) can load code or change what runs.
"""

from __future__ import annotations

import re

__all__ = ["ALLOWED", "JVM_ENV_VARS", "disallowed", "env_tokens", "launcher_tokens"]

#: Environment variables the JVM or the `java` launcher reads options from (HotSpot, and the
#: OpenJ9/IBM JVMs a distribution may ship instead).
JVM_ENV_VARS = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "OPENJ9_JAVA_OPTIONS",
                "IBM_JAVA_OPTIONS")

_SIZE = r"[0-9]{1,12}[kKmMgGtT]?"
_SIZE_FLAGS = (
    "MaxHeapSize", "InitialHeapSize", "MinHeapSize", "SoftMaxHeapSize", "NewSize",
    "MaxNewSize", "MetaspaceSize", "MaxMetaspaceSize", "CompressedClassSpaceSize",
    "MaxDirectMemorySize", "ReservedCodeCacheSize", "ThreadStackSize", "G1HeapRegionSize",
)
_COUNT_FLAGS = (
    "MaxGCPauseMillis", "ParallelGCThreads", "ConcGCThreads", "NewRatio", "SurvivorRatio",
    "MaxTenuringThreshold", "InitiatingHeapOccupancyPercent", "MinHeapFreeRatio",
    "MaxHeapFreeRatio",
)
_SWITCHES = (
    "UseG1GC", "UseParallelGC", "UseSerialGC", "UseZGC", "UseShenandoahGC",
    "UseStringDeduplication", "UseContainerSupport", "AlwaysPreTouch", "UseCompressedOops",
    "UseCompressedClassPointers", "ExitOnOutOfMemoryError", "ParallelRefProcEnabled",
    "DisableExplicitGC",
)
#: Heap and GC sizes and GC choices only; every other JVM argument is rated high.
ALLOWED = re.compile(
    rf"-Xm[sxn]{_SIZE}|-Xss{_SIZE}"
    r"|-XX:(?:Max|Min|Initial)RAMPercentage=[0-9]{1,3}(?:\.[0-9]{1,6})?"
    rf"|-XX:(?:{'|'.join(_SIZE_FLAGS)})={_SIZE}"
    rf"|-XX:(?:{'|'.join(_COUNT_FLAGS)})=[0-9]{{1,9}}"
    rf"|-XX:[+-](?:{'|'.join(_SWITCHES)})",
    re.ASCII,
)

# HotSpot's `Arguments::parse_options_buffer` and the launcher's `JLI_ParseOpts` skip C
# `isspace` characters between options.
_C_SPACE = re.compile(r"[ \t\n\v\f\r]+")


def launcher_tokens(vmargs: str) -> list[str]:
    """The JVM arguments TorchServe's launcher makes of `vmargs`: exactly `str.split()`."""
    return vmargs.split()


def env_tokens(value: str) -> list[str]:
    """The JVM's split of an options variable. Quotes are left in the tokens on purpose: a
    quoted option is not on the allowlist, so it is refused rather than interpreted."""
    return [token for token in _C_SPACE.split(value) if token]


def disallowed(tokens: list[str]) -> list[str]:
    """The tokens that are not a heap or GC setting from the allowlist, in order."""
    return [token for token in tokens if not ALLOWED.fullmatch(token)]
