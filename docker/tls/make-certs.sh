#!/bin/sh
# Make a private CA and a Redis server certificate for hub mode (compose.hub.yml).
#
#   docker/tls/make-certs.sh HUB_DNS_NAME_OR_IP [MORE_NAMES_OR_IPS...]
#
# Writes into this folder (or $GENDERLENS_TLS_DIR): ca.crt (give it to every worker host), ca.key
# (keep it private; only needed to issue more certificates), redis.crt and redis.key (the hub's).
# The names must be the ones workers use in GENDERLENS_REDIS_URL: the certificate is verified.
# The key is made readable by the container's redis user (uid 999) only; run as root or with sudo
# for that chown, or chmod 644 redis.key on a single-user host.
set -eu

if [ "$#" -lt 1 ]; then
    echo "usage: $0 HUB_DNS_NAME_OR_IP [MORE...]" >&2
    exit 2
fi
dir=${GENDERLENS_TLS_DIR:-$(dirname "$0")}
days=${GENDERLENS_TLS_DAYS:-825}

san=""
for name in "$@"; do
    case "$name" in
        *[!0-9.]*) entry="DNS:$name" ;;
        *) entry="IP:$name" ;;
    esac
    san="${san:+$san,}$entry"
done

umask 077
if [ ! -f "$dir/ca.key" ]; then
    openssl req -x509 -new -nodes -newkey rsa:3072 -sha256 -days 3650 \
        -subj "/CN=genderlens-redis-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt"
fi
openssl req -new -nodes -newkey rsa:3072 -sha256 -subj "/CN=$1" \
    -keyout "$dir/redis.key" -out "$dir/redis.csr"
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > "$dir/redis.ext"
openssl x509 -req -in "$dir/redis.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$dir/redis.ext" -out "$dir/redis.crt"
rm -f "$dir/redis.csr" "$dir/redis.ext"
chmod 644 "$dir/ca.crt" "$dir/redis.crt"
if chown 999:999 "$dir/redis.key" 2>/dev/null; then
    chmod 600 "$dir/redis.key"
else
    echo "note: could not chown redis.key to uid 999 (not root); Redis in the container must be able" >&2
    echo "      to read it: sudo chown 999:999 $dir/redis.key, or chmod 644 it on a single-user host" >&2
fi
echo "wrote $dir/ca.crt $dir/redis.crt $dir/redis.key for: $san"
