#!/usr/bin/env bash
# Install or upgrade the edge agent (or the cloud hub) on a k3s cluster from a kustomize
# overlay. Run from anywhere; `install.sh --help` for the options.
#
# What it does, in order:
#   1. checks its arguments and the files they name;
#   2. checks the cluster: kubectl present, API reachable, nodes listed; for an edge overlay
#      also a node with allocatable nvidia.com/gpu (NVIDIA device plugin or GPU operator),
#      enough of them on a node labelled edge.example/gpu=<t4|a40>, and RuntimeClass nvidia;
#   3. renders the overlay (kubectl kustomize);
#   4. creates the namespace, then the Secrets from the files given (never from the
#      repository) and the site's ConfigMap of EDGE_* overrides;
#   5. applies the manifests and waits for the rollout;
#   6. prints how to send a test study and open the UI (or enroll a site at the hub).
# --dry-run does 1-3 (read-only calls to the cluster) and prints what 4-5 would apply, the
# Secrets without their values, and changes nothing.
set -euo pipefail

prog="$(basename "$0")"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBECTL="${KUBECTL:-kubectl}"

usage() {
    cat <<EOF
Usage: $prog --overlay edge-lite|edge-standard|hub [OPTIONS]

Install or upgrade from deploy/k3s/overlays/<overlay>, create its Secrets from files, wait
for the rollout. Re-running it is an upgrade: volumes and existing Secrets are kept.

Edge agent (--overlay edge-lite: one T4; edge-standard: two A40), namespace edge-agent,
Secret edge-agent-secrets:
  --cold-keys FILE           cold-tier key ring ("<key-id> <base64 of 32 bytes>" lines);
                             required when the Secret does not exist yet
  --generate-cold-keys FILE  write a new key ring to FILE (must not exist; mode 0600) and
                             use it. BACK IT UP apart from the data: without it, cold data
                             and the hub archive cannot be read
  --sync-credential FILE     the site's hub credential (from \`edge-agent sync enroll\`);
                             without it the agent runs but does not sync
  --hub-ca FILE              PEM bundle of the hub's certificate authority (a private CA);
                             also sets EDGE_SYNC_HUB_CA_FILE for the agent
  --env EDGE_NAME=VALUE      a config override for this site (ConfigMap edge-agent-site),
                             repeatable, e.g. --env EDGE_DICOM_AE_TITLE=EDGE_MAIN
                             --env EDGE_RESULTS_DESTINATIONS=PACS@10.20.0.5:104
                             (when given, the ConfigMap is rewritten with exactly these)

Cloud hub (--overlay hub), namespace edge-hub, Secrets cloud-hub-secrets, cloud-hub-tls:
  --tls-cert FILE --tls-key FILE
                             the hub's HTTPS certificate chain and key (PEM); required
                             when cloud-hub-tls does not exist yet
  --database-url URL         PostgreSQL URL (postgresql+psycopg://USER:PASS@HOST/DB) for an
  --database-url-file FILE   external database (or the same, read from FILE). Default: the
                             in-cluster StatefulSet, with a generated password
  --ops-token-file FILE      bearer token for the hub's fleet view (HUB_OPS_TOKEN)
  --metrics-token-file FILE  bearer token that reads only the hub's /metrics, for Prometheus
                             (HUB_METRICS_TOKEN)
  --s3-credentials FILE      AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines, for
                             an S3-compatible archive (see overlays/hub/kustomization.yaml)

Both:
  --replace-secrets          rewrite Secrets that already exist (give all their files
                             again; the hub keeps its in-cluster database password)
  --dry-run                  print the manifests it would apply and the Secrets without
                             their values; change nothing
  --timeout SECONDS          how long to wait for the rollout (default 600)
  --skip-gpu-check           do not require a GPU node (e.g. to render on a test cluster)
  -h, --help                 this text

kubectl: \$KUBECTL or the one on PATH; the cluster: \$KUBECONFIG or ~/.kube/config (k3s:
/etc/rancher/k3s/k3s.yaml).

Examples:
  $prog --overlay edge-lite --generate-cold-keys /root/edge-cold-keys --dry-run
  $prog --overlay edge-lite --cold-keys /root/edge-cold-keys \\
      --sync-credential sync-credential.json --hub-ca hub-ca.pem
  $prog --overlay hub --tls-cert hub.crt --tls-key hub.key --ops-token-file ops-token
EOF
}

die() {
    echo "$prog: $*" >&2
    exit 2
}
fail() {
    echo "$prog: $*" >&2
    exit 1
}
say() { echo "$prog: $*" >&2; }

# ---------------------------------------------------------------------------------------
# 1. arguments

overlay=""
cold_keys=""
generate_cold_keys=""
sync_credential=""
hub_ca=""
site_env=()
tls_cert=""
tls_key=""
database_url=""
database_url_file=""
ops_token_file=""
metrics_token_file=""
s3_credentials=""
replace_secrets=0
dry_run=0
timeout=600
skip_gpu_check=0

need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
        die "$1 needs a value (see --help)"
    fi
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --overlay) need_value "$@"; overlay="$2"; shift 2 ;;
        --overlay=*) overlay="${1#*=}"; shift ;;
        --cold-keys) need_value "$@"; cold_keys="$2"; shift 2 ;;
        --generate-cold-keys) need_value "$@"; generate_cold_keys="$2"; shift 2 ;;
        --sync-credential) need_value "$@"; sync_credential="$2"; shift 2 ;;
        --hub-ca) need_value "$@"; hub_ca="$2"; shift 2 ;;
        --env) need_value "$@"; site_env+=("$2"); shift 2 ;;
        --tls-cert) need_value "$@"; tls_cert="$2"; shift 2 ;;
        --tls-key) need_value "$@"; tls_key="$2"; shift 2 ;;
        --database-url) need_value "$@"; database_url="$2"; shift 2 ;;
        --database-url-file) need_value "$@"; database_url_file="$2"; shift 2 ;;
        --ops-token-file) need_value "$@"; ops_token_file="$2"; shift 2 ;;
        --metrics-token-file) need_value "$@"; metrics_token_file="$2"; shift 2 ;;
        --s3-credentials) need_value "$@"; s3_credentials="$2"; shift 2 ;;
        --replace-secrets) replace_secrets=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        --timeout) need_value "$@"; timeout="$2"; shift 2 ;;
        --skip-gpu-check) skip_gpu_check=1; shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

case "$overlay" in
    "") die "--overlay is required: edge-lite, edge-standard or hub (see --help)" ;;
    edge-lite) kind=edge; gpus=1; gpu_label=t4 ;;
    edge-standard) kind=edge; gpus=2; gpu_label=a40 ;;
    hub) kind=hub ;;
    *) die "unknown overlay '$overlay': edge-lite, edge-standard or hub" ;;
esac
overlay_dir="$here/overlays/$overlay"
[ -f "$overlay_dir/kustomization.yaml" ] || fail "no kustomization in $overlay_dir"
if ! [[ "$timeout" =~ ^[0-9]+$ ]] || [ "$timeout" -eq 0 ]; then
    die "--timeout must be a number of seconds, not '$timeout'"
fi

readable() { # option file
    if [ ! -f "$2" ] || [ ! -r "$2" ]; then
        die "$1: cannot read file '$2'"
    fi
    [ -s "$2" ] || die "$1: '$2' is empty"
}

if [ "$kind" = edge ]; then
    for opt in tls_cert tls_key database_url database_url_file ops_token_file metrics_token_file s3_credentials; do
        [ -z "${!opt}" ] || die "--${opt//_/-} is for --overlay hub, not $overlay"
    done
    [ -z "$cold_keys" ] || [ -z "$generate_cold_keys" ] || die "give --cold-keys or --generate-cold-keys, not both"
    if [ -n "$cold_keys" ]; then
        readable --cold-keys "$cold_keys"
        # the agent's format (edge_agent/lifecycle/coldcrypt.py): "<key-id> <base64 32 bytes>"
        grep -Eq '^[[:space:]]*[A-Za-z0-9._-]{1,64}[[:space:]]+[A-Za-z0-9+/]{43}=[[:space:]]*(#.*)?$' "$cold_keys" \
            || die "--cold-keys: '$cold_keys' holds no '<key-id> <base64 of 32 bytes>' line: not a cold-tier key ring"
    fi
    if [ -n "$generate_cold_keys" ]; then
        [ ! -e "$generate_cold_keys" ] || die "--generate-cold-keys: '$generate_cold_keys' exists; it is never overwritten (use --cold-keys to use it)"
        [ -d "$(dirname "$generate_cold_keys")" ] || die "--generate-cold-keys: no folder '$(dirname "$generate_cold_keys")'"
    fi
    [ -z "$sync_credential" ] || readable --sync-credential "$sync_credential"
    [ -z "$hub_ca" ] || readable --hub-ca "$hub_ca"
    if [ -n "$hub_ca" ]; then
        grep -q -- '-----BEGIN CERTIFICATE-----' "$hub_ca" || die "--hub-ca: '$hub_ca' holds no PEM certificate"
    fi
    if [ "${#site_env[@]}" -gt 0 ]; then
        for kv in "${site_env[@]}"; do
            [[ "$kv" =~ ^EDGE_[A-Z0-9_]+=.*$ ]] || die "--env wants EDGE_NAME=VALUE, not '$kv'"
            [[ "$kv" != EDGE_SYNC_HUB_CA_FILE=* ]] || die "--env EDGE_SYNC_HUB_CA_FILE: use --hub-ca FILE"
        done
    fi
    namespace=edge-agent
    workloads=(deployment/edge-agent)
else
    for opt in cold_keys generate_cold_keys sync_credential hub_ca; do
        [ -z "${!opt}" ] || die "--${opt//_/-} is for the edge overlays, not hub"
    done
    [ "${#site_env[@]}" -eq 0 ] || die "--env is for the edge overlays, not hub"
    [ -z "$tls_cert$tls_key" ] || { [ -n "$tls_cert" ] && [ -n "$tls_key" ]; } || die "--tls-cert and --tls-key go together"
    [ -z "$tls_cert" ] || readable --tls-cert "$tls_cert"
    [ -z "$tls_key" ] || readable --tls-key "$tls_key"
    [ -z "$database_url" ] || [ -z "$database_url_file" ] || die "give --database-url or --database-url-file, not both"
    if [ -n "$database_url_file" ]; then
        readable --database-url-file "$database_url_file"
        database_url="$(head -n 1 "$database_url_file" | tr -d '\r\n')"
    fi
    if [ -n "$database_url" ]; then
        [[ "$database_url" =~ ^postgresql(\+[a-z0-9]+)?:// ]] || die "--database-url must be a postgresql:// URL (SQLAlchemy, e.g. postgresql+psycopg://USER:PASS@HOST:5432/DB)"
    fi
    [ -z "$ops_token_file" ] || readable --ops-token-file "$ops_token_file"
    [ -z "$metrics_token_file" ] || readable --metrics-token-file "$metrics_token_file"
    if [ -n "$s3_credentials" ]; then
        readable --s3-credentials "$s3_credentials"
        grep -q '^AWS_ACCESS_KEY_ID=.' "$s3_credentials" || die "--s3-credentials: '$s3_credentials' has no AWS_ACCESS_KEY_ID=... line"
        grep -q '^AWS_SECRET_ACCESS_KEY=.' "$s3_credentials" \
            || die "--s3-credentials: '$s3_credentials' needs AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines"
    fi
    namespace=edge-hub
    workloads=(deployment/cloud-hub)
fi

kc() { "$KUBECTL" "$@"; }

# ---------------------------------------------------------------------------------------
# 2. the cluster

command -v "$KUBECTL" > /dev/null 2>&1 || fail "kubectl not found: install it or set KUBECTL=/path/to/kubectl (k3s installs /usr/local/bin/kubectl)"
kc version > /dev/null 2>&1 || fail "the cluster is not reachable: \`$KUBECTL version\` failed (KUBECONFIG=${KUBECONFIG:-~/.kube/config}; k3s writes /etc/rancher/k3s/k3s.yaml)"

# name, allocatable GPUs, GPU-type label, internal IP: one node a line
nodes="$(kc get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.status.allocatable.nvidia\.com/gpu}{"\t"}{.metadata.labels.edge\.example/gpu}{"\t"}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')" \
    || fail "\`$KUBECTL get nodes\` failed: no permission to list nodes?"
[ -n "$nodes" ] || fail "the cluster has no nodes"
say "cluster reachable, $(printf '%s\n' "$nodes" | grep -c .) node(s)"
node_ip="$(printf '%s\n' "$nodes" | awk -F'\t' 'NF && $4 != "" {print $4; exit}')"

if [ "$kind" = edge ] && [ "$skip_gpu_check" = 0 ]; then
    gpu_nodes="$(printf '%s\n' "$nodes" | awk -F'\t' '$2 ~ /^[0-9]+$/ && $2 > 0')"
    [ -n "$gpu_nodes" ] || fail "no node has allocatable nvidia.com/gpu: install the NVIDIA device plugin or the GPU operator (deploy/k3s/k3s-config/agent.yaml), or --skip-gpu-check"
    fit="$(printf '%s\n' "$gpu_nodes" | awk -F'\t' -v want="$gpus" -v label="$gpu_label" '$3 == label && $2 >= want {print $1; exit}')"
    [ -n "$fit" ] || fail "overlay $overlay needs a node labelled edge.example/gpu=$gpu_label with $gpus allocatable nvidia.com/gpu; GPU nodes: $(printf '%s\n' "$gpu_nodes" | awk -F'\t' '{printf "%s (%s GPU, label %s) ", $1, $2, ($3 == "" ? "none" : $3)}')"
    node_ip="$(printf '%s\n' "$nodes" | awk -F'\t' -v n="$fit" '$1 == n {print $4; exit}')"
    kc get runtimeclass nvidia -o name > /dev/null 2>&1 \
        || fail "RuntimeClass nvidia is missing: k3s creates it when it finds the NVIDIA container runtime on a node (deploy/k3s/k3s-config/agent.yaml), or apply deploy/k3s/k3s-config/runtimeclass-nvidia.yaml"
    say "GPU node $fit: edge.example/gpu=$gpu_label, >= $gpus nvidia.com/gpu, RuntimeClass nvidia present"
fi

# ---------------------------------------------------------------------------------------
# 3. render

work="$(mktemp -d "${TMPDIR:-/tmp}/edge-install.XXXXXX")"
trap 'rm -rf "$work"' EXIT
manifests="$work/manifests.yaml"
kc kustomize "$overlay_dir" > "$manifests" 2> "$work/kustomize.err" \
    || fail "kubectl kustomize $overlay_dir failed: $(cat "$work/kustomize.err")"
grep -q '^kind: ' "$manifests" || fail "kubectl kustomize $overlay_dir rendered nothing"
in_cluster_postgres=0
if grep -q '^  name: cloud-hub-postgres$' "$manifests" && grep -q '^kind: StatefulSet$' "$manifests"; then
    in_cluster_postgres=1
    workloads+=(statefulset/cloud-hub-postgres)
fi

secret_exists() { kc get secret "$1" -n "$namespace" -o name > /dev/null 2>&1; }
secret_value() { # name key -> decoded value (empty if none)
    kc get secret "$1" -n "$namespace" -o "jsonpath={.data.${2//./\\.}}" 2> /dev/null | base64 -d 2> /dev/null || true
}

# ---------------------------------------------------------------------------------------
# 4. what goes into the Secrets (files stay where they are; values never printed)

# Each planned object: "kind name" + its --from-file/--from-literal arguments in a file.
# Secret values never go on a command line (ps would show them): they are written to files
# in the private work folder and passed with --from-file.
planned=()
secret_file() { # key value -> path of a 0600 file holding value (no newline added)
    local path="$work/value-$1"
    (umask 077 && printf '%s' "$2" > "$path")
    echo "$path"
}
plan() { # kind name mode(create|replace) args...
    local kind_="$1" name="$2" mode="$3"
    shift 3
    printf '%s\0' "$@" > "$work/$kind_-$name.args"
    planned+=("$kind_ $name $mode")
}
describe_args() { # file show-literals(0|1): "key: <N bytes from FILE>"; secret values never
    local a key src
    while IFS= read -r -d '' a; do
        case "$a" in
            --from-file=*)
                a="${a#--from-file=}"; key="${a%%=*}"; src="${a#*=}"
                case "$src" in
                    "$work"/*) echo "#   $key: <$(wc -c < "$src" | tr -d ' ') bytes, generated or from the command line>" ;;
                    *) echo "#   $key: <$(wc -c < "$src" | tr -d ' ') bytes from $src>" ;;
                esac
                ;;
            --from-literal=*)
                a="${a#--from-literal=}"; key="${a%%=*}"
                if [ "$2" = 1 ]; then
                    echo "#   $key: ${a#*=}"
                else
                    a="${a#*=}"
                    echo "#   $key: <${#a} characters, generated or given on the command line>"
                fi
                ;;
            --cert=*) echo "#   tls.crt: <from ${a#--cert=}>" ;;
            --key=*) echo "#   tls.key: <from ${a#--key=}>" ;;
        esac
    done < "$1"
}

# the AE title a test study is addressed to
ae="EDGE_AGENT"
if [ "${#site_env[@]}" -gt 0 ]; then
    for kv in "${site_env[@]}"; do
        [[ "$kv" != EDGE_DICOM_AE_TITLE=* ]] || ae="${kv#*=}"
    done
fi

if [ "$kind" = edge ]; then
    given=0
    [ -z "$cold_keys$generate_cold_keys$sync_credential$hub_ca" ] || given=1
    mode=create
    if secret_exists edge-agent-secrets; then
        if [ "$given" = 1 ]; then
            [ "$replace_secrets" = 1 ] || die "the Secret $namespace/edge-agent-secrets exists: to change it give --replace-secrets and all its files again (--cold-keys is required); without secret options it is kept"
            mode=replace
        else
            mode=keep
        fi
    fi
    if [ "$mode" != keep ]; then
        [ -n "$cold_keys$generate_cold_keys" ] || die "the Secret $namespace/edge-agent-secrets $([ "$mode" = create ] && echo "does not exist yet" || echo "would be replaced"): give --cold-keys FILE (or --generate-cold-keys FILE to make a new key ring)"
        if [ -n "$generate_cold_keys" ] && [ "$mode" = replace ]; then
            die "--generate-cold-keys would replace the site's key ring with a new one, and cold data written with the old keys would become unreadable: give --cold-keys with the existing ring (append a key to rotate: deploy/OPERATIONS.md)"
        fi
        if [ -n "$cold_keys" ] && [ "$mode" = replace ]; then
            # every key of the ring in the cluster must still be in the new one
            old_ring="$(secret_value edge-agent-secrets cold-keys)"
            if [ -z "$old_ring" ]; then
                say "warning: could not read the key ring in $namespace/edge-agent-secrets to check that --cold-keys keeps all its keys"
            else
                while read -r kid kval _; do
                    case "$kid" in "" | "#"*) continue ;; esac
                    awk -v id="$kid" -v val="$kval" '$1 == id && $2 == val {found = 1} END {exit !found}' "$cold_keys" \
                        || die "--cold-keys: '$cold_keys' lacks key '$kid' of the ring in the cluster: files written with it would become unreadable. Keep every old key (append new ones)"
                done <<< "$old_ring"
            fi
        fi
        if [ -n "$generate_cold_keys" ]; then
            if [ "$dry_run" = 1 ]; then
                say "dry run: would write a new cold-tier key ring to $generate_cold_keys"
                cold_src="$work/cold-keys.preview"
                printf 'k1-00000000 %s\n' "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" > "$cold_src"
            else
                (
                    umask 077
                    printf '# cold-tier key ring written by install.sh on %s: back it up apart from the data\nk1-%s %s\n' \
                        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
                        "$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')" \
                        "$(head -c 32 /dev/urandom | base64 | tr -d '\n')" > "$generate_cold_keys"
                )
                say "wrote a new cold-tier key ring to $generate_cold_keys: BACK IT UP apart from the data (without it cold data cannot be read)"
                cold_src="$generate_cold_keys"
            fi
        else
            cold_src="$cold_keys"
        fi
        args=("--from-file=cold-keys=$cold_src")
        [ -z "$sync_credential" ] || args+=("--from-file=sync-credential.json=$sync_credential")
        [ -z "$hub_ca" ] || args+=("--from-file=hub-ca.pem=$hub_ca")
        [ -n "$sync_credential" ] || say "no --sync-credential: the agent will run without syncing to the hub (deploy/OPERATIONS.md: enrolling a site)"
        plan secret edge-agent-secrets "$mode" "${args[@]}"
    else
        say "keeping the existing Secret $namespace/edge-agent-secrets"
    fi
    # the site's EDGE_* overrides; the hub CA path whenever the Secret holds one
    if [ "${#site_env[@]}" -gt 0 ] || [ -n "$hub_ca" ]; then
        args=()
        if [ "${#site_env[@]}" -gt 0 ]; then
            for kv in "${site_env[@]}"; do args+=("--from-literal=$kv"); done
        fi
        if [ -n "$hub_ca" ] || { [ "$mode" = keep ] && [ -n "$(secret_value edge-agent-secrets hub-ca.pem)" ]; }; then
            args+=("--from-literal=EDGE_SYNC_HUB_CA_FILE=/etc/edge-agent/secrets/hub-ca.pem")
        fi
        plan configmap edge-agent-site apply "${args[@]}"
    fi
else
    # cloud-hub-tls
    if secret_exists cloud-hub-tls; then
        if [ -n "$tls_cert" ]; then
            [ "$replace_secrets" = 1 ] || die "the Secret $namespace/cloud-hub-tls exists: give --replace-secrets to replace the certificate"
            plan tls cloud-hub-tls replace "--cert=$tls_cert" "--key=$tls_key"
        else
            say "keeping the existing Secret $namespace/cloud-hub-tls"
        fi
    else
        [ -n "$tls_cert" ] || die "the Secret $namespace/cloud-hub-tls does not exist yet: give --tls-cert FILE --tls-key FILE (the hub serves HTTPS itself)"
        plan tls cloud-hub-tls create "--cert=$tls_cert" "--key=$tls_key"
    fi
    # cloud-hub-secrets
    mode=create
    if secret_exists cloud-hub-secrets; then
        if [ -n "$database_url$ops_token_file$metrics_token_file$s3_credentials" ]; then
            [ "$replace_secrets" = 1 ] || die "the Secret $namespace/cloud-hub-secrets exists: give --replace-secrets and all its values again to change it"
            mode=replace
        else
            mode=keep
            say "keeping the existing Secret $namespace/cloud-hub-secrets"
        fi
    fi
    if [ "$mode" != keep ]; then
        args=()
        if [ -z "$database_url" ]; then
            [ "$in_cluster_postgres" = 1 ] || die "the overlay has no in-cluster PostgreSQL: give --database-url or --database-url-file"
            pg_password=""
            if [ "$mode" = replace ]; then
                # the database was initialised with this password: keep it
                pg_password="$(secret_value cloud-hub-secrets postgres-password)"
            fi
            if [ -z "$pg_password" ]; then
                pg_password="$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')"
            fi
            database_url="postgresql+psycopg://hub:${pg_password}@cloud-hub-postgres:5432/hub"
            args+=("--from-file=postgres-password=$(secret_file postgres-password "$pg_password")")
        fi
        args+=("--from-file=database-url=$(secret_file database-url "$database_url")")
        [ -z "$ops_token_file" ] || args+=("--from-file=ops-token=$ops_token_file")
        [ -z "$metrics_token_file" ] || args+=("--from-file=metrics-token=$metrics_token_file")
        if [ -n "$s3_credentials" ]; then
            args+=("--from-file=aws-access-key-id=$(secret_file aws-access-key-id "$(sed -n 's/^AWS_ACCESS_KEY_ID=//p' "$s3_credentials" | head -n 1 | tr -d '\r')")")
            args+=("--from-file=aws-secret-access-key=$(secret_file aws-secret-access-key "$(sed -n 's/^AWS_SECRET_ACCESS_KEY=//p' "$s3_credentials" | head -n 1 | tr -d '\r')")")
        fi
        plan secret cloud-hub-secrets "$mode" "${args[@]}"
    fi
fi

# ---------------------------------------------------------------------------------------
# dry run: print, change nothing

if [ "$dry_run" = 1 ]; then
    echo "# $prog --dry-run: overlay $overlay, namespace $namespace. Nothing was changed."
    echo "# Manifests it would apply (kubectl apply -f -):"
    cat "$manifests"
    if [ "${#planned[@]}" -eq 0 ]; then
        echo "# Secrets and site ConfigMap: none to create (existing ones are kept)."
    else
        for p in "${planned[@]}"; do
            read -r k name mode <<< "$p"
            case "$k" in
                secret | tls) what=Secret ;;
                configmap) what=ConfigMap ;;
            esac
            if [ "$what" = Secret ]; then
                echo "# $what $namespace/$name: would be ${mode}d (values not shown)"
                describe_args "$work/$k-$name.args" 0
            else
                echo "# $what $namespace/$name: would be created or updated with"
                describe_args "$work/$k-$name.args" 1
            fi
        done
    fi
    echo "# Then it would wait for: ${workloads[*]} (kubectl rollout status, ${timeout}s)."
    if [ "$kind" = edge ]; then
        echo "# Test study: storescu -aet STORESCU -aec $ae ${node_ip:-<node-ip>} 30104 file.dcm"
        echo "# Web UI:     http://${node_ip:-<node-ip>}:30080/"
    fi
    exit 0
fi

# ---------------------------------------------------------------------------------------
# 4-5. apply

existed=0
kc get deployment "${workloads[0]#deployment/}" -n "$namespace" -o name > /dev/null 2>&1 && existed=1

if [ "$kind" = edge ]; then
    ns_file="$here/base/namespace.yaml"
else
    ns_file="$overlay_dir/namespace.yaml"
fi
kc apply -f "$ns_file" > /dev/null
runtime_changed=0
if [ "${#planned[@]}" -gt 0 ]; then
    for p in "${planned[@]}"; do
        read -r k name mode <<< "$p"
        args=()
        while IFS= read -r -d '' a; do args+=("$a"); done < "$work/$k-$name.args"
        case "$k" in
            secret) create=(create secret generic "$name" -n "$namespace") ;;
            tls) create=(create secret tls "$name" -n "$namespace") ;;
            configmap) create=(create configmap "$name" -n "$namespace") ;;
        esac
        case "$mode" in
            create) kc "${create[@]}" "${args[@]}" > /dev/null ;;
            # no last-applied annotation: it would hold a second copy of the values
            replace) kc "${create[@]}" "${args[@]}" --dry-run=client -o yaml | kc replace -f - > /dev/null ;;
            apply) kc "${create[@]}" "${args[@]}" --dry-run=client -o yaml | kc apply -f - > /dev/null ;;
        esac
        case "$mode" in
            create) say "$k $namespace/$name: created" ;;
            replace) say "$k $namespace/$name: replaced" ;;
            apply) say "$k $namespace/$name: created or updated" ;;
        esac
        runtime_changed=1
    done
fi

say "applying $overlay"
kc apply -f "$manifests"
if [ "$existed" = 1 ] && [ "$runtime_changed" = 1 ]; then
    # Secrets and the site ConfigMap are read at start: restart to pick them up
    kc rollout restart "${workloads[0]}" -n "$namespace" > /dev/null
    say "restarted ${workloads[0]} for the new Secrets/site settings"
fi

for w in "${workloads[@]}"; do
    say "waiting for $w (up to ${timeout}s)"
    if ! kc rollout status "$w" -n "$namespace" --timeout="${timeout}s"; then
        kc get pods -n "$namespace" -o wide >&2 || true
        if [ "$kind" = edge ]; then
            say "the agent is not Ready. /readyz needs the store writable, the DICOM listener up and an active model: a fresh agent has no model yet (install one: deploy/OPERATIONS.md, 'Models'). It already receives studies (the Service does not wait for readiness). Details: $KUBECTL describe pod -n $namespace -l app.kubernetes.io/name=edge-agent; $KUBECTL logs -n $namespace deploy/edge-agent"
        else
            say "details: $KUBECTL describe pod -n $namespace; $KUBECTL logs -n $namespace deploy/cloud-hub"
        fi
        exit 3
    fi
done

# ---------------------------------------------------------------------------------------
# 6. what next

if [ "$kind" = edge ]; then
    pod_ip="$(kc get pods -n "$namespace" -l app.kubernetes.io/name=edge-agent,app.kubernetes.io/component=agent -o 'jsonpath={.items[0].status.hostIP}' 2> /dev/null || true)"
    ip="${pod_ip:-${node_ip:-<node-ip>}}"
    cat <<EOF

The edge agent ($overlay) is running in namespace $namespace.

Send a test study (from a host the NetworkPolicy and dicom.allowed_callers admit: the PACS
range, 10.20.0.0/16 in the base; STORESCU is an allowed calling AE title there):
  storescu -aet STORESCU -aec $ae $ip 30104 file.dcm
  $KUBECTL exec -n $namespace deploy/edge-agent -- edge-agent studies

Web UI (from the hospital LAN, 10.30.0.0/16 in the base): http://$ip:30080/
  first account: $KUBECTL exec -it -n $namespace deploy/edge-agent -- edge-agent users add admin --role admin

Status: $KUBECTL exec -n $namespace deploy/edge-agent -- edge-agent sync status
Back up the cold-tier key ring apart from the data (deploy/OPERATIONS.md).
EOF
else
    lb="$(kc get service cloud-hub -n "$namespace" -o 'jsonpath={.status.loadBalancer.ingress[0].ip}' 2> /dev/null || true)"
    cat <<EOF

The cloud hub is running in namespace $namespace: https://${lb:-${node_ip:-<node-ip>}}/ (port 443 and 8443).

Enroll a site (prints a one-time token for the site's operator):
  $KUBECTL exec -n $namespace deploy/cloud-hub -- cloud-hub sites enroll "St. Mary radiology"
Fleet view: https://${lb:-${node_ip:-<node-ip>}}/fleet (HTTP Basic with the ops token)
EOF
fi
