#!/usr/bin/env bash
# Make sure the services the test-suite talks to exist: a Mosquitto binary (tests start their own
# broker on a free port), a PostgreSQL server on 127.0.0.1:5432 (tests create their own
# database), Debian's chromium with its chromedriver (the dashboard's browser test), Debian's
# swupdate (the hawkBit client of tests/test_ddi_swupdate.py), and nginx and wrk (the benchmarks'
# references, which tests/test_bench_smoke.py runs). On a machine without them, install them with
# apt-get and start them.
set -euo pipefail

need_apt=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
# the dashboard's browser test (tests/test_dashboard.py) drives Debian's chromium headless
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
# the hawkBit acceptance test (tests/test_ddi_swupdate.py) runs Debian's SWUpdate's suricatta client
[ -x /usr/bin/swupdate ] || need_apt+=(swupdate)
# bench/delta_bench.py compiles a Cortex-M program twice (its smoke run too)
command -v arm-none-eabi-gcc >/dev/null || need_apt+=(gcc-arm-none-eabi libnewlib-arm-none-eabi)
# the benchmarks' smoke runs (tests/test_bench_smoke.py): nginx is the reference server, wrk the
# load generator, curl the agent's reference; each script starts its own nginx on a free port
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)

installed_postgres=false
if [ ${#need_apt[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
        echo "ensure-services: missing ${need_apt[*]}; install them (apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
    echo "ensure-services: installing ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    case " ${need_apt[*]} " in *" postgresql "*) installed_postgres=true ;; esac
fi

version=$(ls /etc/postgresql | sort -V | tail -n 1)
if $installed_postgres; then
    # A test machine's fresh PostgreSQL: let the postgres role in over loopback without a
    # password, as the tests (and this project's CI machines) expect.
    hba=/etc/postgresql/$version/main/pg_hba.conf
    sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "ensure-services: starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
    pg_isready -h 127.0.0.1 -p 5432
elif $installed_postgres; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
fi
