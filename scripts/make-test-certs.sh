#!/usr/bin/env bash
# Make a small X.509 PKI for trying chainvault's TLS (and for its tests):
#
#   make-test-certs.sh DIR [NAME]
#
# DIR/ca-cert.pem, ca-key.pem        a CA
# DIR/server-cert.pem, server-key.pem  signed by it, for localhost, 127.0.0.1, ::1
#                                      and NAME if given
# DIR/client-cert.pem, client-key.pem  a client certificate signed by it
# DIR/other/...                        the same three again under a second,
#                                      unrelated CA (a client the server must refuse)
#
# The file names are the ones GnuTLS-based peers look for in a certificate
# directory: libnbd's `tls-certificates=DIR` and QEMU's
# `--object tls-creds-x509,dir=DIR` (server side: ca-cert, server-cert,
# server-key; client side: ca-cert, client-cert, client-key).
#
# For real use, take certificates from your own PKI; these keys are not
# protected and the CA key sits next to them.
set -euo pipefail

dir=${1:?usage: make-test-certs.sh DIR [NAME]}
name=${2:-}
command -v openssl >/dev/null || { echo "make-test-certs.sh: openssl is needed (apt-get install openssl)" >&2; exit 1; }

pki() {
    local d=$1 cn=$2
    mkdir -p "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$d/ca-key.pem" -out "$d/ca-cert.pem" -days 3650 \
        -subj "/CN=$cn" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    local san="DNS:localhost,IP:127.0.0.1,IP:::1"
    [[ -n $name ]] && san="$san,DNS:$name"
    leaf "$d" server "/CN=localhost" "$san" serverAuth
    leaf "$d" client "/CN=chainvault test client" "DNS:client" clientAuth
}

leaf() {
    local d=$1 kind=$2 subj=$3 san=$4 eku=$5
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$d/$kind-key.pem" -out "$d/$kind.csr" -subj "$subj" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
        "$eku" "$san" >"$d/$kind.ext"
    openssl x509 -req -in "$d/$kind.csr" -CA "$d/ca-cert.pem" -CAkey "$d/ca-key.pem" \
        -CAcreateserial -out "$d/$kind-cert.pem" -days 3650 -extfile "$d/$kind.ext" 2>/dev/null
    rm -f "$d/$kind.csr" "$d/$kind.ext"
}

pki "$dir" "chainvault test CA"
pki "$dir/other" "an unrelated CA"
rm -f "$dir"/*.srl "$dir"/other/*.srl
chmod 600 "$dir"/*-key.pem "$dir"/other/*-key.pem
echo "$dir"
