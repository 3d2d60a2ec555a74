#!/usr/bin/env bash
# Installs everything pochta and its tests need on a Debian machine: Debian packages (when root)
# and a virtual environment in .venv with pochta installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=${1:-}

debs="ca-certificates"
if [ "$want_test" = "test" ]; then
    debs="$debs swaks libnet-ssleay-perl curl msmtp dnsmasq-base postfix strace"
fi
missing=""
for p in $debs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages:$missing" >&2
        export DEBIAN_FRONTEND=noninteractive
        # Postfix must not start on install: tests configure and start their own instances.
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends $missing >/dev/null
        rm -f /usr/sbin/policy-rc.d
    else
        echo "setup: missing Debian packages (run as root to install):$missing" >&2
    fi
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
stamp=.venv/.pochta-installed-$want_test
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    if [ "$want_test" = "test" ]; then
        .venv/bin/pip install -q -e '.[test,fast,postgres]'
    else
        .venv/bin/pip install -q -e '.[fast]'
    fi
    touch "$stamp"
fi

# The hot path compiled to C with mypyc (scripts/build_native.py; POCHTA_NATIVE=0 skips it). A
# failed build leaves pochta running from source, slower but the same.
if [ "${POCHTA_NATIVE:-1}" != 0 ]; then
    .venv/bin/python scripts/build_native.py || echo "setup: running pochta from source" >&2
fi
