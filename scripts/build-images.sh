#!/usr/bin/env bash
# Build mmnotify's container image where no container registry is reachable.
#
#   scripts/build-images.sh [--rebuild]
#
# Needs: root (debootstrap), Docker, debootstrap (installed with apt-get when
# missing and run as root), python3 with venv of the same major.minor as the
# base's python3 (bookworm: 3.11), and this machine's own package sources:
# a Debian mirror for the base, PyPI (or wheels/ already filled) for the wheels.
#
# Steps, each skipped when already done (so running it again is cheap):
#   1. base image  mmnotify-base:SUITE  a Debian root file system made with
#      `debootstrap --variant=minbase` (python3, python3-venv, ca-certificates)
#      from the mirror and suite this machine's apt already uses, brought in
#      with `docker import`.  Skipped when the image exists, unless --rebuild.
#   2. wheels/     every dependency and the build backend (setuptools, wheel)
#      as wheels, made here with `pip wheel . -w wheels/` (offline from wheels/
#      itself when it already holds them; --rebuild fetches them again).
#   3. image       mmnotify:latest  `docker build --build-arg BASE_IMAGE=<base>`
#      with --network none: the Dockerfile builds the project from its source
#      and installs it with `pip --no-index --find-links wheels/`, so nothing
#      is downloaded while the image is built.
#
# Environment (all optional):
#   MMN_IMAGE       image to build              (mmnotify:latest)
#   MMN_BASE_IMAGE  base image                  (mmnotify-base:SUITE)
#   MMN_MIRROR      Debian mirror for debootstrap (from /etc/apt/sources*)
#   MMN_SUITE       Debian suite                (from /etc/apt/sources*)
#   PYTHON          python that builds the wheels (python3)
#   MMN_BUILD_DIR   scratch space: build venv, rootfs (build/images)
#
# Nothing it makes is committed: wheels/, build/ and rootfs/ are in .gitignore
# and .dockerignore keeps build/ out of the image.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REBUILD=0
for arg in "$@"; do
    case "$arg" in
        --rebuild) REBUILD=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-images.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python3}
IMAGE=${MMN_IMAGE:-mmnotify:latest}
WORK=${MMN_BUILD_DIR:-$ROOT/build/images}
WHEELS=$ROOT/wheels
mkdir -p "$WORK" "$WHEELS"

# One build at a time (two test runs may start this script together).
if command -v flock >/dev/null; then
    exec 9>"$WORK/.lock"
    flock 9
fi

say() { printf '%s build-images: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (is dockerd running? are you in the docker group?)"
command -v "$PYTHON" >/dev/null || die "no $PYTHON (set PYTHON=...)"

# The first Debian source of this machine whose suite is a plain codename
# (not -updates/-security) with component main: "MIRROR SUITE KEYRING".
apt_source() {
    "$PYTHON" - <<'EOF'
import glob, os, re
codename = ""
try:
    for line in open("/etc/os-release"):
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
except OSError:
    pass
found = []  # (uri, suite, keyring)
def consider(types, uris, suites, comps, keyring):
    if "deb" not in types or "main" not in comps:
        return
    for uri in uris:
        if not re.match(r"(https?|file)://", uri):
            continue
        for suite in suites:
            if suite and "-" not in suite and "/" not in suite:
                found.append((uri, suite, keyring))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        consider(fields.get("types", "").split(), fields.get("uris", "").split(),
                 fields.get("suites", "").split(), fields.get("components", "").split(),
                 fields.get("signed-by", ""))
lists = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
for path in lists:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = line.split("#", 1)[0].strip()
        keyring = ""
        m = re.search(r"\[([^]]*)\]", line)
        if m:
            for opt in m.group(1).split():
                if opt.startswith("signed-by="):
                    keyring = opt.split("=", 1)[1]
            line = line[:m.start()] + line[m.end():]
        words = line.split()
        if len(words) >= 4:
            consider([words[0]], [words[1]], [words[2]], words[3:], keyring)
found.sort(key=lambda f: f[1] != codename)  # this machine's own suite first
if found:
    uri, suite, keyring = found[0]
    print(uri, suite, keyring if os.path.isfile(keyring) else "")
EOF
}

SOURCE=$(apt_source)
MIRROR=${MMN_MIRROR:-$(echo "$SOURCE" | awk '{print $1}')}
SUITE=${MMN_SUITE:-$(echo "$SOURCE" | awk '{print $2}')}
KEYRING=$(echo "$SOURCE" | awk '{print $3}')
BASE=${MMN_BASE_IMAGE:-mmnotify-base:${SUITE:-bookworm}}

# ---- 1. the base image -------------------------------------------------------
t0=$SECONDS
if [ "$REBUILD" = 0 ] && docker image inspect "$BASE" >/dev/null 2>&1; then
    say "base $BASE exists (--rebuild to make it again)"
else
    [ -n "$MIRROR" ] && [ -n "$SUITE" ] ||
        die "no Debian mirror/suite found in /etc/apt/sources*; set MMN_MIRROR and MMN_SUITE"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root: run this script as root (sudo $0)"
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap (apt-get install -y debootstrap)"
        apt-get install -y debootstrap >/dev/null 2>&1 ||
            { apt-get update >/dev/null && apt-get install -y debootstrap >/dev/null; } ||
            die "could not install debootstrap: apt-get install debootstrap"
    fi
    rootfs=$(mktemp -d "$WORK/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    say "debootstrap --variant=minbase $SUITE from $MIRROR (about a minute)"
    keyopt=()
    [ -n "$KEYRING" ] && [ -z "${MMN_MIRROR:-}" ] && keyopt=(--keyring="$KEYRING")
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "${keyopt[@]}" "$SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
    say "docker import -> $BASE"
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $SUITE $MIRROR" \
        - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "base $BASE built in $((SECONDS - t0))s"
fi

# The wheels must fit the python inside the base (cp311 wheels for 3.11).
image_py=$(docker run --rm --pull never --network none --entrypoint python3 "$BASE" \
    -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$BASE has no working python3"
here_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$image_py" = "$here_py" ] ||
    die "$BASE has python $image_py but $PYTHON is $here_py: set PYTHON=python$image_py (wheels must match)"

# ---- 2. wheels -----------------------------------------------------------------
t1=$SECONDS
venv=$WORK/venv-$here_py
if [ ! -x "$venv/bin/pip" ]; then
    "$PYTHON" -m venv "$venv"
fi
if [ "$REBUILD" = 1 ]; then
    rm -f "$WHEELS"/*.whl
fi
# The build backend, kept in the build venv so later runs need no index.
"$venv/bin/python" -c 'import setuptools, wheel' 2>/dev/null ||
    "$venv/bin/pip" install -q --disable-pip-version-check "setuptools>=68" wheel
# The image builds the project from its source in an isolated build
# environment: the backend's wheels go into wheels/ too.
mapfile -t backend < <("$venv/bin/python" -c '
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$ROOT/pyproject.toml")
# setuptools' build/lib may hold files deleted from the source since: clear it.
rm -rf "$ROOT/build/lib" "$ROOT"/build/bdist.*
pipwheel=("$venv/bin/pip" wheel -q --disable-pip-version-check
          --no-build-isolation -w "$WHEELS" "$ROOT" "${backend[@]}")
if "${pipwheel[@]}" --no-index --find-links "$WHEELS" 2>/dev/null; then
    say "wheels built from wheels/ alone (no index) in $((SECONDS - t1))s"
else
    say "fetching dependency wheels from the package index"
    "${pipwheel[@]}" --find-links "$WHEELS" || die "pip wheel failed"
    say "wheels built in $((SECONDS - t1))s"
fi
# Only the dependencies stay: the project's own wheel would go stale.
rm -f "$WHEELS"/mmnotify-*.whl
ls "$WHEELS"/*.whl >/dev/null 2>&1 || die "no wheels in $WHEELS"

# ---- 3. the image --------------------------------------------------------------
t2=$SECONDS
say "docker build $IMAGE from $BASE (--network none)"
docker build --network none --force-rm --build-arg BASE_IMAGE="$BASE" \
    --label org.opencontainers.image.title=mmnotify \
    --label "org.opencontainers.image.base.name=$BASE" \
    -t "$IMAGE" "$ROOT" >"$WORK/docker-build.log" 2>&1 ||
    { tail -30 "$WORK/docker-build.log" >&2; die "docker build failed (log: $WORK/docker-build.log)"; }
say "image $IMAGE built in $((SECONDS - t2))s (total $((SECONDS - t0))s)"
docker run --rm --pull never --network none "$IMAGE" --help >/dev/null || die "$IMAGE does not run mmn"
# Images earlier builds left untagged (no container uses them): gone.
docker image prune -f --filter label=org.opencontainers.image.title=mmnotify >/dev/null 2>&1 || true
echo "$IMAGE"
