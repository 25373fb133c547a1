#!/usr/bin/env bash
# Peer benchmark: Cairn against restic and borg on one seeded sample disk image.
#
# For each run and each tool (cairn: an encrypted vault, the default; cairn-plain: init
# --no-encryption; restic, which always encrypts; borg --encryption=repokey-blake2 with its
# default chunker; borg-fixed: the same with --chunker-params fixed,65536): fresh repository, full
# backup of the image, 1% of its 4 KiB blocks overwritten at random offsets and an
# incremental backup, then 64 MiB overwritten contiguously and another incremental
# ("contiguous"), then a restore of the last backup (checked byte for byte with cmp).
# Two baselines per run: `cp --sparse=always --reflink=never` of the image (the copy floor
# of a full backup) and the engine's bare read + zero-skip + SHA-256 pass over the changed
# image (`scan_file` example: the floor of an incremental without changed-block tracking).
# Every timed step includes a `sync`. Prints a markdown table of medians (wall, CPU, peak
# RSS, repository growth) and the ratios, and writes it to $BENCH_DIR/results.md. See
# docs/performance.md.
#
# Settings (environment):
#   SIZE=4G           size of the sample image (anything `cairn-agent sample create --size` takes)
#   RUNS=3            runs; the table shows medians
#   COLD=0            1: `sync; echo 3 > /proc/sys/vm/drop_caches` before each timed step (root)
#                     0: warm page cache (the input is read once before each timed step)
#   BENCH_DIR=        scratch folder (default: a new mktemp -d under /var/tmp; never tmpfs)
#   KEEP=0            1: keep images, repositories and restores (otherwise removed at the end;
#                     results.md and bench.log are always kept)
#   TOOLS=            the tools to run, space-separated (default: cairn cairn-plain restic borg borg-fixed)
#   CAIRN_AGENT=      the agent binary (default: target/release/cairn-agent of this repository,
#                     built with `cargo build --release -p cairn-agent` if missing)
#
# Example: SIZE=256M RUNS=1 benches/peers.sh
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)

SIZE=${SIZE:-4G}
RUNS=${RUNS:-3}
COLD=${COLD:-0}
KEEP=${KEEP:-0}
read -r -a TOOLS <<<"${TOOLS:-cairn cairn-plain restic borg borg-fixed}"
STEPS=(full incremental contiguous restore)
BASELINES=(cp sha256)

die() {
    echo "peers.sh: error: $*" >&2
    exit 1
}
note() { echo "peers.sh: $*" >&2; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
[[ $COLD == 0 || $COLD == 1 ]] || die "COLD must be 0 or 1, got '$COLD'"
[[ $KEEP == 0 || $KEEP == 1 ]] || die "KEEP must be 0 or 1, got '$KEEP'"

# ---------------------------------------------------------------- prerequisites

apt_updated=0
apt_install() { # apt_install PACKAGE... ; `apt-get update` only when the install fails without it
    [[ $(id -u) == 0 ]] || die "missing $*: install them (apt-get install $*) or run as root"
    command -v apt-get >/dev/null || die "missing $* and no apt-get: install them by hand"
    note "installing $* with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; then
        if [[ $apt_updated == 0 ]]; then
            note "apt-get install failed; running apt-get update and retrying"
            apt-get update -q >/dev/null || die "apt-get update failed"
            apt_updated=1
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null ||
                die "apt-get install $* failed"
        else
            die "apt-get install $* failed"
        fi
    fi
}

missing=()
command -v restic >/dev/null || missing+=(restic)
command -v borg >/dev/null || missing+=(borgbackup)
[[ -x /usr/bin/time ]] || missing+=(time)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"
command -v restic >/dev/null || die "restic still not found after installing it"
command -v borg >/dev/null || die "borg still not found after installing borgbackup"
[[ -x /usr/bin/time ]] || die "/usr/bin/time still not found after installing time"
for c in cmp du df numfmt sort awk find; do
    command -v "$c" >/dev/null || die "missing command: $c"
done

if [[ -n ${CAIRN_AGENT:-} ]]; then
    [[ -x $CAIRN_AGENT ]] || die "CAIRN_AGENT=$CAIRN_AGENT is not an executable file"
else
    CAIRN_AGENT=$REPO_ROOT/target/release/cairn-agent
    if [[ ! -x $CAIRN_AGENT ]]; then
        command -v cargo >/dev/null || die "$CAIRN_AGENT is missing and cargo is not installed"
        note "building cairn-agent (cargo build --release -p cairn-agent)"
        (cd "$REPO_ROOT" && cargo build --release -p cairn-agent) ||
            die "cargo build --release -p cairn-agent failed"
        [[ -x $CAIRN_AGENT ]] || die "the build did not produce $CAIRN_AGENT"
    fi
fi
CAIRN_AGENT=$(readlink -f "$CAIRN_AGENT")
SCAN_FILE=$REPO_ROOT/target/release/examples/scan_file
if [[ ! -x $SCAN_FILE ]]; then
    note "building the scan_file example (cargo build --release -p cairn-benches --example scan_file)"
    (cd "$REPO_ROOT" && cargo build --release -q -p cairn-benches --example scan_file) ||
        die "cannot build the scan_file example"
fi

if [[ $COLD == 1 ]]; then
    [[ $(id -u) == 0 && -w /proc/sys/vm/drop_caches ]] ||
        die "COLD=1 needs root and a writable /proc/sys/vm/drop_caches"
fi

# ---------------------------------------------------------------- scratch folder

fstype_of() { df --output=fstype "$1" 2>/dev/null | tail -n 1 | tr -d ' '; }

created_dir=0
if [[ -n ${BENCH_DIR:-} ]]; then
    if [[ ! -d $BENCH_DIR ]]; then
        mkdir -p "$BENCH_DIR" || die "cannot create BENCH_DIR=$BENCH_DIR"
        created_dir=1
    fi
else
    [[ $(fstype_of /var/tmp) != tmpfs ]] ||
        die "/var/tmp is tmpfs; set BENCH_DIR to a folder on a real disk"
    BENCH_DIR=$(mktemp -d /var/tmp/cairn-peers.XXXXXX) || die "mktemp -d under /var/tmp failed"
    created_dir=1
fi
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
FSTYPE=$(fstype_of "$BENCH_DIR")
if [[ $FSTYPE == tmpfs ]]; then
    [[ $created_dir == 0 ]] || rmdir "$BENCH_DIR"
    die "BENCH_DIR=$BENCH_DIR is on tmpfs (RAM): choose a folder on a disk"
fi

DATA=$BENCH_DIR/data
[[ ! -e $DATA ]] || die "$DATA already exists (left by an earlier KEEP=1 run?): remove it or pick another BENCH_DIR"
LOG=$BENCH_DIR/bench.log
RESULTS=$BENCH_DIR/results.md
RECORDS=$BENCH_DIR/records.tsv
TIMEFILE=$BENCH_DIR/time.out

cleanup() {
    local rc=$?
    set +e
    if [[ $KEEP == 1 ]]; then
        note "KEEP=1: kept everything in $BENCH_DIR"
    else
        rm -rf "$DATA" "$TIMEFILE"
        note "removed the images, repositories and restores under $BENCH_DIR (KEEP=1 keeps them)"
    fi
    if [[ $rc != 0 ]]; then
        note "FAILED (exit $rc). Last lines of $LOG:"
        tail -n 25 "$LOG" >&2 2>/dev/null
    fi
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$DATA" "$DATA/cache"
: >"$LOG"
: >"$RECORDS"

# Keep tool caches and state inside the scratch folder.
export RESTIC_PASSWORD=bench
export BORG_PASSPHRASE=bench
# Cairn's key: a key file made by init (a passphrase would add one Argon2id per command).
CAIRN_KEY=$DATA/cairn.key
export RESTIC_CACHE_DIR=$DATA/cache/restic
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_BASE_DIR=$DATA/cache/borg

# Disk space: pristine + working image + restore (at most SIZE each) + a repository.
if size_bytes=$(numfmt --from=iec "${SIZE%B}" 2>/dev/null) ||
    size_bytes=$(numfmt --from=auto "${SIZE%B}" 2>/dev/null); then
    avail=$(($(df --output=avail -k "$BENCH_DIR" | tail -n 1) * 1024))
    need=$((size_bytes * 4))
    ((avail >= need)) ||
        die "$BENCH_DIR has $(numfmt --to=iec "$avail") free; SIZE=$SIZE needs about $(numfmt --to=iec "$need")"
fi

# ---------------------------------------------------------------- helpers

PRISTINE=$DATA/pristine.img
IMG_NAME=disk.img
IMG=$DATA/$IMG_NAME
REPO=$DATA/repo
OUT=$DATA/restore

log_section() { printf '\n==== %s\n' "$*" >>"$LOG"; }

run() { # run CMD...: untimed step, output to the log
    log_section "$*"
    "$@" >>"$LOG" 2>&1 || die "command failed: $*"
}

repo_bytes() { du -sb "$REPO" | cut -f1; }

prepare() { # prepare FILE_OR_DIR...: warm (read once) or cold (drop caches)
    # Flush first: the image was just copied or mutated, and its dirty pages must not be
    # written back inside the next timed step (its `sync` would wait for them).
    sync
    if [[ $COLD == 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        local p
        for p in "$@"; do
            if [[ -d $p ]]; then
                find "$p" -type f -exec cat {} + >/dev/null
            else
                cat "$p" >/dev/null
            fi
        done
    fi
}

# timed RUN TOOL STEP DIR CMD...: runs CMD in DIR followed by `sync`, under /usr/bin/time;
# records wall, user+sys CPU, peak RSS and repository growth.
timed() {
    local run_no=$1 tool=$2 step=$3 dir=$4
    shift 4
    local before after growth wall user sys rss cpu
    before=$(repo_bytes)
    log_section "[run $run_no] $tool $step: (cd $dir && $* && sync)"
    (cd "$dir" && /usr/bin/time -f '%e %U %S %M' -o "$TIMEFILE" sh -c '"$@" && sync' sh "$@") >>"$LOG" 2>&1 ||
        die "$tool $step failed: $*"
    after=$(repo_bytes)
    read -r wall user sys rss < <(tail -n 1 "$TIMEFILE")
    [[ $wall =~ ^[0-9.]+$ && $rss =~ ^[0-9]+$ ]] || die "cannot parse /usr/bin/time output: $(cat "$TIMEFILE")"
    if [[ $step == restore ]]; then growth=-; else growth=$((after - before)); fi
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run_no" "$tool" "$step" "$wall" "$cpu" "$rss" "$growth" >>"$RECORDS"
    note "run $run_no: $tool $step: ${wall}s wall, ${cpu}s CPU, $((rss / 1024)) MiB RSS$([[ $growth == - ]] || echo ", repo +$growth B")"
}

check_restore() { # check_restore TOOL FILE
    [[ -f $2 ]] || die "$1: restored image $2 not found"
    cmp -s "$2" "$IMG" || {
        cmp "$2" "$IMG" >&2 || true
        die "$1: RESTORED IMAGE DIFFERS from the mutated image (rerun with KEEP=1 to inspect $BENCH_DIR)"
    }
}

find_restored() { # find_restored DIR: the one file named $IMG_NAME below DIR
    local found
    mapfile -t found < <(find "$1" -type f -name "$IMG_NAME")
    ((${#found[@]} == 1)) || die "expected one $IMG_NAME below $1, found ${#found[@]}"
    echo "${found[0]}"
}

RESTIC_RESTORE_SPARSE=()
if restic restore --help 2>/dev/null | grep -q -- '--sparse'; then RESTIC_RESTORE_SPARSE=(--sparse); fi

bench_tool() { # bench_tool RUN TOOL SEED
    local run_no=$1 tool=$2 seed=$3 restored
    rm -rf "$REPO" "$OUT"
    cp --sparse=always "$PRISTINE" "$IMG" || die "cannot reset $IMG from $PRISTINE"

    case $tool in
    cairn) rm -f "$CAIRN_KEY" && run "$CAIRN_AGENT" init --vault "$REPO" --key-file "$CAIRN_KEY" ;;
    cairn-plain) run "$CAIRN_AGENT" init --vault "$REPO" --no-encryption ;;
    restic) run restic init -r "$REPO" ;;
    borg | borg-fixed) run borg init --encryption=repokey-blake2 "$REPO" ;;
    esac

    local step
    for step in full incremental contiguous; do
        case $step in
        incremental) run "$CAIRN_AGENT" sample mutate "$IMG" --fraction 0.01 --seed "$seed" ;;
        contiguous) run "$CAIRN_AGENT" sample mutate "$IMG" --range 1G:64M --seed "$seed" ;;
        esac
        prepare "$IMG"
        case $tool in
        cairn) timed "$run_no" cairn "$step" "$DATA" "$CAIRN_AGENT" backup --vault "$REPO" --key-file "$CAIRN_KEY" --vm bench --disk "disk=$IMG" ;;
        cairn-plain) timed "$run_no" cairn-plain "$step" "$DATA" "$CAIRN_AGENT" backup --vault "$REPO" --vm bench --disk "disk=$IMG" ;;
        restic) timed "$run_no" restic "$step" "$DATA" restic -r "$REPO" backup "$IMG_NAME" ;;
        borg) timed "$run_no" borg "$step" "$DATA" borg create "$REPO::$step" "$IMG_NAME" ;;
        borg-fixed)
            timed "$run_no" borg-fixed "$step" "$DATA" borg create --chunker-params fixed,65536 "$REPO::$step" "$IMG_NAME"
            ;;
        esac
    done

    mkdir -p "$OUT"
    prepare "$REPO"
    case $tool in
    cairn)
        timed "$run_no" cairn restore "$OUT" "$CAIRN_AGENT" restore --vault "$REPO" --key-file "$CAIRN_KEY" --vm bench --disk disk --to "$OUT/$IMG_NAME"
        restored=$OUT/$IMG_NAME
        ;;
    cairn-plain)
        timed "$run_no" cairn-plain restore "$OUT" "$CAIRN_AGENT" restore --vault "$REPO" --vm bench --disk disk --to "$OUT/$IMG_NAME"
        restored=$OUT/$IMG_NAME
        ;;
    restic)
        timed "$run_no" restic restore "$OUT" restic -r "$REPO" restore latest --target "$OUT" "${RESTIC_RESTORE_SPARSE[@]}"
        restored=$(find_restored "$OUT")
        ;;
    borg | borg-fixed)
        timed "$run_no" "$tool" restore "$OUT" borg extract --sparse "$REPO::contiguous"
        restored=$(find_restored "$OUT")
        ;;
    esac
    check_restore "$tool" "$restored"
    note "run $run_no: $tool restore matches the mutated image"
    rm -rf "$REPO" "$OUT"
}

# ---------------------------------------------------------------- the benchmark

CMDLINE=$(printf '%q ' "SIZE=$SIZE" "RUNS=$RUNS" "COLD=$COLD" "KEEP=$KEEP" "BENCH_DIR=$BENCH_DIR" \
    "CAIRN_AGENT=$CAIRN_AGENT" "$0" "$@")
CMDLINE=${CMDLINE% }

note "scratch folder $BENCH_DIR ($FSTYPE), log $LOG"
note "creating a $SIZE sample image (seed 1)"
run "$CAIRN_AGENT" sample create "$PRISTINE" --size "$SIZE" --seed 1
sed -n '$p' "$LOG" >&2

bench_baselines() { # bench_baselines RUN SEED: the copy floor and the hash-scan floor
    local run_no=$1 seed=$2
    rm -rf "$REPO" "$OUT"
    mkdir -p "$REPO"
    cp --sparse=always "$PRISTINE" "$IMG" || die "cannot reset $IMG from $PRISTINE"
    prepare "$IMG"
    timed "$run_no" cp full "$DATA" cp --sparse=always --reflink=never "$IMG" "$REPO/copy.img"
    rm -f "$REPO/copy.img"
    run "$CAIRN_AGENT" sample mutate "$IMG" --fraction 0.01 --seed "$seed"
    prepare "$IMG"
    timed "$run_no" sha256 incremental "$DATA" "$SCAN_FILE" "$IMG"
    rm -rf "$REPO"
}

for ((r = 1; r <= RUNS; r++)); do
    seed=$((r + 1)) # the same mutation for every tool within a run
    bench_baselines "$r" "$seed"
    for tool in "${TOOLS[@]}"; do
        bench_tool "$r" "$tool" "$seed"
    done
done

# ---------------------------------------------------------------- report

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
col() { awk -F'\t' -v t="$1" -v s="$2" -v c="$3" '$2 == t && $3 == s { print $c }' "$RECORDS"; }

declare -A WALL
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
restic_ver=$(restic version 2>/dev/null | awk '{ print $2 }')
borg_ver=$(borg --version 2>/dev/null | awk '{ print $2 }')
cairn_ver=$("$CAIRN_AGENT" --version 2>/dev/null | awk '{ print $NF }')

{
    mode=warm
    [[ $COLD == 1 ]] && mode="cold (drop_caches before each step)"
    echo "### Cairn vs restic vs borg: $SIZE sample image, 1% of 4 KiB blocks changed, then 64 MiB contiguous, median of $RUNS run(s), page cache $mode"
    echo
    echo "| tool | step | median wall s | median CPU s | peak RSS MiB | repo growth MiB |"
    echo "|---|---|---:|---:|---:|---:|"
    for tool in "${TOOLS[@]}"; do
        for step in "${STEPS[@]}"; do
            wall=$(col "$tool" "$step" 4 | median)
            cpu=$(col "$tool" "$step" 5 | median)
            rss=$(col "$tool" "$step" 6 | sort -g | tail -n 1)
            if [[ $step == restore ]]; then
                growth=-
            else
                growth=$(col "$tool" "$step" 7 | median | awk '{ printf "%.1f", $1 / 1048576 }')
            fi
            WALL[$tool.$step]=$wall
            printf '| %s | %s | %.2f | %.2f | %.1f | %s |\n' "$tool" "$step" "$wall" "$cpu" \
                "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')" "$growth"
        done
    done
    for base in cp.full sha256.incremental; do
        tool=${base%%.*} step=${base#*.}
        wall=$(col "$tool" "$step" 4 | median)
        cpu=$(col "$tool" "$step" 5 | median)
        WALL[$base]=$wall
        printf '| %s (baseline) | %s | %.2f | %.2f | - | - |\n' "$tool" "$step" "$wall" "$cpu"
    done
    echo
    awk -v c="${WALL[cairn.full]}" -v b="${WALL[cp.full]}" \
        'BEGIN { if (b > 0) printf "cairn full / cp: %.2f. ", c / b }'
    awk -v c="${WALL[cairn.incremental]}" -v b="${WALL[sha256.incremental]}" \
        'BEGIN { if (b > 0) printf "cairn incremental / bare read+SHA-256 pass: %.2f.\n", c / b }'
    echo
    echo "| wall-time ratio | full | incremental | contiguous | restore |"
    echo "|---|---:|---:|---:|---:|"
    for peer in cairn-plain borg borg-fixed restic; do
        printf '| %s/cairn |' "$peer"
        for step in "${STEPS[@]}"; do
            awk -v p="${WALL[$peer.$step]}" -v c="${WALL[cairn.$step]}" \
                'BEGIN { if (c > 0) printf " %.2f |", p / c; else printf " n/a |" }'
        done
        echo
    done
    echo
    echo "Encryption: cairn AES-256-GCM (keyed HMAC-SHA256 chunk ids), cairn-plain none; restic AES-256-CTR + Poly1305-AES;" \
        "borg --encryption=repokey-blake2 (AES-256-CTR + BLAKE2b MAC). Cairn and borg restore sparse files;" \
        "restic $restic_ver restores$( ((${#RESTIC_RESTORE_SPARSE[@]})) && echo " with --sparse" || echo " without --sparse (not supported), writing zeros in full")."
    echo "Defaults of each tool: cairn 64 KiB fixed blocks, zstd level 1; restic content-defined chunks (~1 MiB average)," \
        "zstd (auto, repository v2); borg content-defined chunks (~2 MiB average), lz4; borg-fixed: 64 KiB fixed chunks, lz4." \
        "Scattered 4 KiB changes touch most large chunks, so the peers' incrementals store much more."
    echo "Every timed step includes sync. CPU = user + sys. Peak RSS = maximum over runs. Repo growth = du -sb after minus before."
    echo
    echo "Machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, Linux $(uname -r), scratch file system $FSTYPE."
    echo "Versions: cairn-agent $cairn_ver, restic $restic_ver, borg $borg_ver."
    echo "Command: \`$CMDLINE\`"
} >"$RESULTS"

echo
cat "$RESULTS"
echo
echo "Results written to $RESULTS (per-step records in $RECORDS, tool output in $LOG)"
