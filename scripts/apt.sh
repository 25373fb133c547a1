# Sourced by the test and image scripts: installs Debian packages, as root or through sudo.
#
# A previous run killed in the middle of an install (a CI job hitting its limit, a session
# ending) leaves dpkg "interrupted", and every later apt-get refuses to run until
# `dpkg --configure -a` finishes the job. Finish it first, so one killed run does not fail
# every run after it.
apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    if [ -n "$(ls -A /var/lib/dpkg/updates 2>/dev/null)" ] \
        || [ -n "$($sudo dpkg --audit 2>/dev/null || echo failed)" ]; then
        echo "dpkg was left half-way by an earlier run: finishing it (dpkg --configure -a)" >&2
        $sudo dpkg --configure -a >&2
        $sudo apt-get install -y -qq -f >&2
    fi
    $sudo apt-get update -qq >&2
    $sudo apt-get install -y -qq "$@" >&2
}
