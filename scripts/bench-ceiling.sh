#!/usr/bin/env bash
# What bounds an agent's receive path on this machine, measured now, for one size:
#   * sha256 and AES-256-GCM bytes per second on one core (openssl speed, 1 MiB buffers): the
#     agent hashes every byte, and TLS decrypts it (rustls negotiates AES-GCM here);
#   * the disk: dd of zeros with conv=fsync into KM_BENCH_DIR;
#   * a raw copy by standard tools: socat (OpenSSL) over TLS on loopback piped into
#     dd conv=fsync, from a file of random bytes (sender and receiver on this machine, as in the
#     transfer bench).
# Prints one line per ceiling in MiB/s and, last, `lowest <MiB/s> <what>` (scripts/bench.sh
# compares the agent's upload rate with it).
#
#   scripts/bench-ceiling.sh [MIB]     (default 1024; KM_BENCH_DIR default /var/tmp)
# Installs socat from Debian's archive when missing.
set -euo pipefail
mib=${1:-1024}
dir=$(mktemp -d "${KM_BENCH_DIR:-/var/tmp}/km-ceiling.XXXXXX")
port=${KM_CEILING_PORT:-29558}
cleanup() {
  pkill -f "OPENSSL-LISTEN:$port" 2> /dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
if ! command -v socat > /dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends socat > /dev/null ||
    { apt-get update > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends socat > /dev/null; }
fi

rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1048576 }'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { print b - a }'; }

# openssl speed prints thousands of bytes per second for the 1 MiB buffer.
speed() { openssl speed -evp "$1" -seconds 1 -bytes 1048576 2> /dev/null | awk -v n="$1" 'tolower($1) == tolower(n) { sub(/k$/, "", $2); printf "%.0f", $2 * 1000 / 1048576 }'; }
sha=$(speed sha256)
gcm=$(speed aes-256-gcm)

t=$(now)
dd if=/dev/zero of="$dir/disk" bs=1M count="$mib" conv=fsync status=none
disk=$(rate $((mib << 20)) "$(elapsed "$t")")
rm -f "$dir/disk"

head -c $((mib << 20)) /dev/urandom > "$dir/in"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/key" -out "$dir/crt" \
  -days 1 -subj /CN=127.0.0.1 2> /dev/null
cat "$dir/crt" "$dir/key" > "$dir/pem"
sync
(socat -b 1048576 -u "OPENSSL-LISTEN:$port,bind=127.0.0.1,cert=$dir/pem,verify=0,reuseaddr" - |
  dd of="$dir/out" bs=1M iflag=fullblock conv=fsync status=none) &
receiver=$!
# Listening (a connection to probe it would be its only one).
for _ in $(seq 50); do [[ -n $(ss -ltnH "sport = :$port") ]] && break; sleep 0.1; done
t=$(now)
socat -b 1048576 -u - "OPENSSL:127.0.0.1:$port,verify=0" < "$dir/in"
wait "$receiver"
tls=$(rate $((mib << 20)) "$(elapsed "$t")")
cmp -s "$dir/in" "$dir/out" || { echo "socat copy differs from its source" >&2; exit 1; }

echo "sha256 (1 core)            $sha MiB/s"
echo "AES-256-GCM (1 core)       $gcm MiB/s"
echo "disk write + fsync         $disk MiB/s ($mib MiB)"
echo "socat TLS -> dd + fsync    $tls MiB/s ($mib MiB)"
printf '%s sha256\n%s AES-256-GCM\n%s disk\n%s socat-TLS-to-disk\n' "$sha" "$gcm" "$disk" "$tls" |
  sort -n | head -n 1 | awk '{ print "lowest " $1 " " $2 }'
