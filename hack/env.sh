#!/usr/bin/env bash
# Local real services for development and tests, on this machine only:
#
#   etcd + kube-apiserver + kube-controller-manager + kube-scheduler  (built from source, see
#     build-k8s.sh)
#   a real node: containerd + runc, kubelet, kube-proxy and a CNI bridge (node.sh); the project's
#     image and a pause image are imported into containerd, never pulled
#   Kafka in KRaft mode, one combined broker/controller (jars from Maven Central); tests may add
#     a second broker (`start kafka-broker2`) to take a partition's only replica away
#   Redis, and a Redis Cluster of 3 masters with one replica each and a password (Debian's
#     redis-server); both with AOF on, as production runs them
#   Prometheus (Debian), scraping file_sd targets and, through the API server, the pods
#
# Host tools use 127.0.0.1; the API server, Kafka (a second listener) and Redis also listen on
# the node address (the gateway address of the pods' bridge, created first) so pods reach them.
#
# Usage: hack/env.sh up|down|status|start|stop [service...]
#   up       install/build what is missing, then start every service that is not running
#   build-deps  install only the Debian packages a `cargo build` needs (librdkafka's headers)
#   down     stop every service this script started and undo the node's host changes
#   leftovers  list what of a stopped environment is still on the host (status 1 if anything)
#   load-image FILE  import an OCI archive (make image) into the node's containerd
#   status   one line per service: state, version, address
#   start S  / stop S   start or stop single services (tests stop and restart Kafka this way)
#   revive-cluster-node PORT  start a Redis Cluster node that a test killed, with its data and
#            its cluster membership (tests crash single nodes this way)
#
# Ports are fixed offsets from QP_PORT_BASE (default 17000) so that URLs stay stable between runs;
# a taken port is an error that names the port and the fix. Every address is written to
# $QP_RUN/env, which tests and tools read: nothing else should know a port number.
source "$(dirname "$0")/lib.sh"

QP_PORT_BASE="${QP_PORT_BASE:-17000}"
PORT_ETCD=$((QP_PORT_BASE + 1))
PORT_ETCD_PEER=$((QP_PORT_BASE + 2))
PORT_APISERVER=$((QP_PORT_BASE + 3))
PORT_KCM=$((QP_PORT_BASE + 4))
PORT_KAFKA=$((QP_PORT_BASE + 5))
PORT_KAFKA_CONTROLLER=$((QP_PORT_BASE + 6))
PORT_REDIS=$((QP_PORT_BASE + 7))
PORT_PROMETHEUS=$((QP_PORT_BASE + 9))
PORTS_REDIS_CLUSTER=($((QP_PORT_BASE + 10)) $((QP_PORT_BASE + 11)) $((QP_PORT_BASE + 12)))
PORT_KUBELET=$((QP_PORT_BASE + 13))
PORT_KUBELET_HEALTHZ=$((QP_PORT_BASE + 14))
PORT_SCHEDULER=$((QP_PORT_BASE + 15))
PORT_PROXY_METRICS=$((QP_PORT_BASE + 16))
PORT_PROXY_HEALTHZ=$((QP_PORT_BASE + 17))
PORT_KAFKA_POD=$((QP_PORT_BASE + 18))
PORT_KAFKA_BROKER2=$((QP_PORT_BASE + 19))
# Kafka's SASL_SSL listener (SCRAM-SHA-512 users, a certificate from the environment's own CA).
PORT_KAFKA_SASL=$((QP_PORT_BASE + 33))
# The same for pods, on the node address.
PORT_KAFKA_SASL_POD=$((QP_PORT_BASE + 35))
# Redis's TLS port (same server; certificate from the environment's CA, an ACL user).
PORT_REDIS_TLS=$((QP_PORT_BASE + 34))
# One replica per Redis Cluster master (the failover fault test promotes one).
PORTS_REDIS_CLUSTER_REPLICAS=($((QP_PORT_BASE + 30)) $((QP_PORT_BASE + 31)) $((QP_PORT_BASE + 32)))

# In start order; `down` stops in reverse. node-network (an interface and sysctls, no process)
# comes first because the API server, Kafka and Redis listen on its address.
ALL_SERVICES=(node-network etcd kube-apiserver kube-controller-manager kube-scheduler containerd
  kubelet kube-proxy kafka redis redis-cluster prometheus)
PIDS="$QP_RUN/pids"
LOGS="$QP_RUN/logs"
DATA="$QP_RUN/data"
CERTS="$QP_RUN/pki"
KUBECONFIG_FILE="$QP_RUN/kubeconfig"
# Local development secrets: generated once per environment, readable only by the owner.
SECRETS_FILE="$QP_RUN/secrets"
source "$QP_ROOT/hack/node.sh"

# ---------------------------------------------------------------------------------------------
# Installation

# apt_install [test-tools]: Debian packages the services and the build need; with `test-tools`
# also those only the test suite uses (a headless Chromium for the dashboard screenshot test).
apt_install() {
  local missing=()
  if [[ "${1:-}" == test-tools ]]; then
    command -v chromium >/dev/null || missing+=(chromium)
    # The node and the image built for it without a registry.
    command -v containerd >/dev/null || missing+=(containerd)
    command -v runc >/dev/null || missing+=(runc)
    [[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v buildah >/dev/null || missing+=(buildah)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v skopeo >/dev/null || missing+=(skopeo)
  fi
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  command -v cmake >/dev/null || missing+=(cmake)
  # librdkafka (built by the rdkafka crate) needs these headers.
  [[ -f /usr/include/x86_64-linux-gnu/curl/curl.h || -f /usr/include/curl/curl.h ]] || missing+=(libcurl4-openssl-dev)
  [[ -f /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
  [[ -f /usr/include/zlib.h ]] || missing+=(zlib1g-dev)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}"
  log "installing Debian packages: ${missing[*]}"
  run_logged "apt-get install" "$QP_CACHE/build/apt.log" bash -c \
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}"
  # Debian's packages start system services of their own; ours run on other ports, but an
  # unused system Redis/Prometheus is noise, so leave them stopped where the init system allows.
}

# install_all [service...]: install and build what the given services need (default: all of
# them, plus the test tools). `up kafka redis prometheus` (make demo) builds no Kubernetes.
install_all() {
  (($#)) || set -- "${ALL_SERVICES[@]}"
  local want=" $* " kafka_pid=""
  mkdir -p "$QP_CACHE/build"
  if ((${#ALL_SERVICES[@]} == $#)); then apt_install test-tools; else apt_install; fi
  if [[ "$want" == *" kafka "* ]]; then
    "$QP_ROOT/hack/fetch-kafka.sh" &
    kafka_pid=$!
  fi
  # helm is only ever used against the API server.
  if [[ "$want" == *" kube-"* ]]; then
    "$QP_ROOT/hack/build-k8s.sh"
    "$QP_ROOT/hack/build-helm.sh"
  fi
  if [[ "$want" == *" etcd "* ]]; then "$QP_ROOT/hack/build-etcd.sh"; fi
  # Debian's Prometheus lacks Kubernetes discovery, which the end-to-end tests need.
  if [[ "$want" == *" kubelet "* ]]; then "$QP_ROOT/hack/build-prometheus.sh"; fi
  [[ -z "$kafka_pid" ]] || wait "$kafka_pid" || die "fetching Kafka failed (see above)"
}

# ---------------------------------------------------------------------------------------------
# Process bookkeeping

pidfile() { echo "$PIDS/$1.pid"; }

running() {
  local f pid
  [[ "$1" == node-network ]] && { node_network_up; return; }
  f="$(pidfile "$1")"
  [[ -f "$f" ]] || return 1
  for pid in $(cat "$f"); do alive "$pid" || return 1; done
}

# alive PID: the process exists and is not a zombie (a service killed by a test lingers as one
# where nothing reaps orphans, and kill -0 alone would call it running).
alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }" # the state letter follows the command name in parentheses
  [[ -n "$stat" && "${stat:0:1}" != Z ]]
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

require_ports() {
  local svc="$1"; shift
  local p
  for p in "$@"; do
    port_free "$p" || die "port $p (for $svc) on 127.0.0.1 is already in use by another program.
  Fix: stop that program (\`ss -ltnp 'sport = :$p'\` shows it), or pick another range with
  QP_PORT_BASE=<n> make env-up   (ports n+1 .. n+19 and n+30 .. n+33 are used; make demo adds n+20 .. n+28)"
  done
}

# spawn <service> <logname> <cmd...>: start in its own session so `stop` can kill the group.
spawn() {
  local svc="$1" name="$2"; shift 2
  mkdir -p "$PIDS" "$LOGS"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >>"$(pidfile "$svc")"
}

# wait_for <service> <seconds> <check command...>
wait_for() {
  local svc="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    running "$svc" || { tail -n 20 "$LOGS/$svc"*.log >&2 || true; die "$svc exited during startup (log: $LOGS)"; }
    ((SECONDS < deadline)) || { tail -n 20 "$LOGS/$svc"*.log >&2 || true; die "$svc not ready after ${secs}s (log: $LOGS)"; }
    sleep 0.2
  done
}

stop_service() {
  local svc="$1" f pid
  f="$(pidfile "$svc")"
  [[ -f "$f" ]] || return 0
  for pid in $(cat "$f"); do
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  local deadline=$((SECONDS + 20))
  for pid in $(cat "$f"); do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    # A killed JVM keeps its listening ports until the kernel has torn down all its threads
    # (a fraction of a second): a `start` right after would find the port taken.
    local gone=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < gone)); do sleep 0.1; done
  done
  rm -f "$f"
}

# ---------------------------------------------------------------------------------------------
# Services

secret() {
  # secret <name>: a random value generated once per environment
  mkdir -p "$QP_RUN"
  touch "$SECRETS_FILE"; chmod 600 "$SECRETS_FILE"
  local v
  v="$(grep "^$1=" "$SECRETS_FILE" | cut -d= -f2- || true)"
  if [[ -z "$v" ]]; then
    v="$(openssl rand -hex 16)"
    echo "$1=$v" >>"$SECRETS_FILE"
  fi
  echo "$v"
}

start_etcd() {
  require_ports etcd "$PORT_ETCD" "$PORT_ETCD_PEER"
  mkdir -p "$DATA/etcd"
  spawn etcd etcd "$ETCD_BIN/etcd" --name qp --data-dir "$DATA/etcd" \
    --listen-client-urls "http://127.0.0.1:$PORT_ETCD" --advertise-client-urls "http://127.0.0.1:$PORT_ETCD" \
    --listen-peer-urls "http://127.0.0.1:$PORT_ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$PORT_ETCD_PEER" \
    --initial-cluster "qp=http://127.0.0.1:$PORT_ETCD_PEER" --log-level warn \
    --quota-backend-bytes 2147483648 --unsafe-no-fsync
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$PORT_ETCD/health"
}

pki() {
  mkdir -p "$CERTS"
  [[ -f "$CERTS/sa.key" ]] || openssl genrsa -out "$CERTS/sa.key" 2048 2>/dev/null
  [[ -f "$CERTS/sa.pub" ]] || openssl rsa -in "$CERTS/sa.key" -pubout -out "$CERTS/sa.pub" 2>/dev/null
  local token
  token="$(secret admin_token)"
  # The static token file is the simplest real authenticator: the admin is in system:masters.
  echo "$token,qp-admin,qp-admin,system:masters" >"$CERTS/tokens.csv"
  # The node's kubelet is in system:nodes (the Node authorizer scopes it to its own node);
  # Prometheus discovers pods with a read-only identity (see prometheus_rbac).
  echo "$(secret kubelet_token),system:node:$NODE_NAME,system:node:$NODE_NAME,system:nodes" >>"$CERTS/tokens.csv"
  echo "$(secret prometheus_token),qp-prometheus,qp-prometheus,qp:prometheus" >>"$CERTS/tokens.csv"
  # A CA, and certificates it signs: the API server's serving certificate (not a CA itself:
  # rustls rejects a CA certificate presented as the server's own, CaUsedAsEndEntity) valid for
  # every address a client uses, including the `kubernetes` Service IP that pods dial, and the
  # client certificate the API server presents to the kubelet.
  if [[ ! -f "$CERTS/ca.crt" ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=qp-local-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2>/dev/null
    rm -f "$CERTS/apiserver.crt" "$CERTS/kubelet-client.crt"
  fi
  local san="IP:127.0.0.1,IP:$NODE_IP,IP:$SERVICE_IP_APISERVER,DNS:localhost,DNS:kubernetes"
  san+=",DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  [[ -f "$CERTS/apiserver.crt" ]] && ! openssl x509 -in "$CERTS/apiserver.crt" -noout -ext subjectAltName 2>/dev/null \
    | grep -q "IP Address:$NODE_IP" && rm -f "$CERTS/apiserver.crt"
  [[ -f "$CERTS/apiserver.crt" ]] || sign_cert apiserver "/CN=kube-apiserver" serverAuth "$san"
  # The kubelet authorizes the API server's calls (logs, exec) by this identity.
  [[ -f "$CERTS/kubelet-client.crt" ]] || sign_cert kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth ""
  chmod 600 "$CERTS"/*
}

# sign_cert <name> <subject> <serverAuth|clientAuth> <subjectAltName or "">
sign_cert() {
  local ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$3"
  [[ -n "$4" ]] && ext+=$'\n'"subjectAltName=$4"
  openssl req -new -newkey rsa:2048 -nodes -subj "$2" -keyout "$CERTS/$1.key" -out "$CERTS/$1.csr" 2>/dev/null
  openssl x509 -req -in "$CERTS/$1.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" -CAcreateserial \
    -days 3650 -extfile <(echo "$ext") -out "$CERTS/$1.crt" 2>/dev/null
  rm -f "$CERTS/$1.csr"
}

write_kubeconfig() {
  local token
  token="$(secret admin_token)"
  cat >"$KUBECONFIG_FILE" <<KC
apiVersion: v1
kind: Config
clusters:
- name: qp-local
  cluster:
    server: https://$NODE_IP:$PORT_APISERVER
    certificate-authority: $CERTS/ca.crt
users:
- name: qp-admin
  user:
    token: $token
contexts:
- name: qp-local
  context: {cluster: qp-local, user: qp-admin, namespace: default}
current-context: qp-local
KC
  chmod 600 "$KUBECONFIG_FILE"
}

start_kube_apiserver() {
  running etcd || die "kube-apiserver needs etcd: run hack/env.sh start etcd"
  node_network_up || die "kube-apiserver listens on the node address: hack/env.sh start node-network"
  require_ports kube-apiserver "$PORT_APISERVER"
  pki
  mkdir -p "$CERTS"
  # Bound to the node address only (pods reach it through the `kubernetes` Service, which
  # kube-proxy maps to the advertise address); the ServiceAccount admission plugin stays on so
  # pods get their token volume.
  spawn kube-apiserver kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$PORT_ETCD" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$PORT_APISERVER" \
    --cert-dir "$CERTS" --tls-cert-file "$CERTS/apiserver.crt" --tls-private-key-file "$CERTS/apiserver.key" \
    --client-ca-file "$CERTS/ca.crt" \
    --kubelet-client-certificate "$CERTS/kubelet-client.crt" --kubelet-client-key "$CERTS/kubelet-client.key" \
    --token-auth-file "$CERTS/tokens.csv" --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$CERTS/sa.pub" --service-account-signing-key-file "$CERTS/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=false --v 1
  write_kubeconfig
  wait_for kube-apiserver 90 "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" get --raw /readyz
  prometheus_rbac
}

start_kube_controller_manager() {
  running kube-apiserver || die "kube-controller-manager needs kube-apiserver"
  require_ports kube-controller-manager "$PORT_KCM"
  spawn kube-controller-manager kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$KUBECONFIG_FILE" --authentication-kubeconfig "$KUBECONFIG_FILE" \
    --authorization-kubeconfig "$KUBECONFIG_FILE" \
    --bind-address 127.0.0.1 --secure-port "$PORT_KCM" --cert-dir "$CERTS/kcm" \
    --leader-elect=false --use-service-account-credentials=false \
    --controllers garbagecollector,deployment,replicaset,namespace,serviceaccount,serviceaccount-token,nodelifecycle,root-ca-cert-publisher,endpoint,endpointslice,podgc,clusterrole-aggregation \
    --service-account-private-key-file "$CERTS/sa.key" --root-ca-file "$CERTS/ca.crt" \
    --concurrent-gc-syncs 5 --v 1
  wait_for kube-controller-manager 60 curl -fsSk "https://127.0.0.1:$PORT_KCM/healthz"
}

kafka_java() {
  java -Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$QP_RUN/kafka/log4j2.properties" -cp "$KAFKA_LIBS/*" "$@"
}

# services_tls NAME: a CA made by the environment for its services (its own, so that `make demo`
# needs no Kubernetes PKI; made once) and a server certificate it signs for NAME, for 127.0.0.1,
# localhost and the node address (pods connect there), in $QP_RUN/tls: NAME.crt, NAME.key, and NAME.pem (key and chain in one file, as
# Kafka reads them).
services_tls() {
  local dir="$QP_RUN/tls"
  mkdir -p "$dir"
  if [[ ! -f "$dir/ca.crt" ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=qp-services-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  fi
  # Remade when it predates the node address in its names.
  [[ -f "$dir/$1.pem" ]] && grep -q "IP:$NODE_IP" "$dir/$1.ext" 2>/dev/null && return 0
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$dir/$1.key" -out "$dir/$1.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$NODE_IP" >"$dir/$1.ext"
  openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3650 -extfile "$dir/$1.ext" -out "$dir/$1.crt" 2>/dev/null
  cat "$dir/$1.key" "$dir/$1.crt" >"$dir/$1.pem"
  chmod 600 "$dir"/*.key "$dir/$1.pem"
}

# kafka_scram_user NAME PASSWORD: a SCRAM-SHA-512 user, made with Kafka's own tool.
kafka_scram_user() {
  kafka_java kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$PORT_KAFKA" --alter \
    --add-config "SCRAM-SHA-512=[iterations=4096,password=$2]" \
    --entity-type users --entity-name "$1" >>"$LOGS/kafka-users.log" 2>&1 \
    || { tail "$LOGS/kafka-users.log" >&2; die "creating the Kafka SCRAM user $1 failed"; }
}

start_kafka() {
  require_ports kafka "$PORT_KAFKA" "$PORT_KAFKA_CONTROLLER" "$PORT_KAFKA_SASL" "$PORT_KAFKA_SASL_POD"
  mkdir -p "$QP_RUN/kafka" "$DATA/kafka"
  services_tls kafka
  # With the node up, a second listener on the node address, advertised as such, serves pods.
  # A third demands SASL (SCRAM-SHA-512) over TLS, as production brokers do.
  local listeners="PLAINTEXT://127.0.0.1:$PORT_KAFKA,SASL_SSL://127.0.0.1:$PORT_KAFKA_SASL"
  local advertised="PLAINTEXT://127.0.0.1:$PORT_KAFKA,SASL_SSL://127.0.0.1:$PORT_KAFKA_SASL"
  local protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL"
  if node_network_up; then
    listeners+=",PODS://$NODE_IP:$PORT_KAFKA_POD,PODS_SASL_SSL://$NODE_IP:$PORT_KAFKA_SASL_POD"
    advertised+=",PODS://$NODE_IP:$PORT_KAFKA_POD,PODS_SASL_SSL://$NODE_IP:$PORT_KAFKA_SASL_POD"
    protocols+=",PODS:PLAINTEXT,PODS_SASL_SSL:SASL_SSL"
  fi
  cat >"$QP_RUN/kafka/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$PORT_KAFKA_CONTROLLER
listeners=$listeners,CONTROLLER://127.0.0.1:$PORT_KAFKA_CONTROLLER
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
log.dirs=$DATA/kafka
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Lets a test give its workers a short session timeout (the stall after a crash); the broker
# default refuses anything below 6 s.
group.min.session.timeout.ms=1000
auto.create.topics.enable=false
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$QP_RUN/tls/kafka.pem
listener.name.pods_sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.pods_sasl_ssl.ssl.keystore.type=PEM
listener.name.pods_sasl_ssl.ssl.keystore.location=$QP_RUN/tls/kafka.pem
PROPS
  cat >"$QP_RUN/kafka/log4j2.properties" <<'L4J'
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
L4J
  if [[ ! -f "$DATA/kafka/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$LOGS/kafka-format.log")"
    kafka_java kafka.tools.StorageTool format --ignore-formatted -t "$cluster_id" \
      -c "$QP_RUN/kafka/server.properties" >>"$LOGS/kafka-format.log" 2>&1 \
      || { tail "$LOGS/kafka-format.log" >&2; die "formatting Kafka storage failed"; }
  fi
  # Readiness is read from this start's log only.
  [[ -f "$LOGS/kafka.log" ]] && mv "$LOGS/kafka.log" "$LOGS/kafka.log.prev"
  spawn kafka kafka java -Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$QP_RUN/kafka/log4j2.properties" -cp "$KAFKA_LIBS/*" \
    kafka.Kafka "$QP_RUN/kafka/server.properties"
  wait_for kafka 90 grep -q "Kafka Server started" "$LOGS/kafka.log"
  # Users live in the cluster's metadata log: made once per data directory, not per start (a
  # restart test measures from the broker being back).
  if [[ ! -f "$DATA/kafka/.scram-qp-client" ]]; then
    kafka_scram_user qp-client "$(secret kafka_scram_password)"
    touch "$DATA/kafka/.scram-qp-client"
  fi
}

# A second broker (broker role only, node id 2) in the cluster of `kafka`, for tests that need a
# partition whose only replica can be stopped while the rest of Kafka answers (a partition
# without a leader): `hack/env.sh start kafka-broker2` / `stop kafka-broker2`. Not started by
# `up`; stopped with kafka.
start_kafka_broker2() {
  running kafka || die "kafka-broker2 joins the cluster of kafka: start kafka first"
  require_ports kafka-broker2 "$PORT_KAFKA_BROKER2"
  local dir="$QP_RUN/kafka-broker2" data="$DATA/kafka-broker2"
  mkdir -p "$dir" "$data"
  cat >"$dir/server.properties" <<PROPS
process.roles=broker
node.id=2
controller.quorum.voters=1@127.0.0.1:$PORT_KAFKA_CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$PORT_KAFKA_BROKER2
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT_KAFKA_BROKER2
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
auto.create.topics.enable=false
PROPS
  if [[ ! -f "$data/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(grep '^cluster.id=' "$DATA/kafka/meta.properties" | cut -d= -f2)"
    [[ -n "$cluster_id" ]] || die "no cluster.id in $DATA/kafka/meta.properties"
    kafka_java kafka.tools.StorageTool format --ignore-formatted -t "$cluster_id" \
      -c "$dir/server.properties" >>"$LOGS/kafka-broker2-format.log" 2>&1 \
      || { tail "$LOGS/kafka-broker2-format.log" >&2; die "formatting kafka-broker2's storage failed"; }
  fi
  [[ -f "$LOGS/kafka-broker2.log" ]] && mv "$LOGS/kafka-broker2.log" "$LOGS/kafka-broker2.log.prev"
  spawn kafka-broker2 kafka-broker2 java -Xms128m -Xmx384m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$QP_RUN/kafka/log4j2.properties" -cp "$KAFKA_LIBS/*" \
    kafka.Kafka "$dir/server.properties"
  wait_for kafka-broker2 90 grep -q "Kafka Server started" "$LOGS/kafka-broker2.log"
}

start_redis() {
  require_ports redis "$PORT_REDIS" "$PORT_REDIS_TLS"
  mkdir -p "$DATA/redis"
  # A TLS port as production Redis has (clients present no certificate; the server's comes from
  # the environment's CA), and an ACL user with a password: the tests of TLS and of refused
  # credentials use it. The password stays out of the command line (ps shows that).
  services_tls redis
  cat >"$DATA/redis/tls.conf" <<CONF
tls-port $PORT_REDIS_TLS
tls-cert-file $QP_RUN/tls/redis.crt
tls-key-file $QP_RUN/tls/redis.key
tls-ca-cert-file $QP_RUN/tls/ca.crt
tls-auth-clients no
user qp-app on >$(secret redis_app_password) ~* &* +@all
CONF
  chmod 600 "$DATA/redis/tls.conf"
  local bind=127.0.0.1
  node_network_up && bind+=" $NODE_IP"
  # Protected mode would refuse the pods (not loopback); the node address is reachable only
  # from this machine and its pods.
  # AOF on, fsync every second, as production runs it: a restart keeps the data (the Redis
  # restart fault test relies on it).
  # shellcheck disable=SC2086 # two addresses, one argument each
  spawn redis redis redis-server "$DATA/redis/tls.conf" --bind $bind --port "$PORT_REDIS" --save "" \
    --appendonly yes --appendfsync everysec \
    --dir "$DATA/redis" --protected-mode "$(node_network_up && echo no || echo yes)"
  wait_for redis 20 redis-cli -p "$PORT_REDIS" ping
}

start_redis_cluster() {
  local all=("${PORTS_REDIS_CLUSTER[@]}" "${PORTS_REDIS_CLUSTER_REPLICAS[@]}")
  require_ports redis-cluster "${all[@]}"
  local pass p
  pass="$(secret redis_cluster_password)"
  for p in "${all[@]}"; do
    mkdir -p "$DATA/redis-cluster/$p"
    # A fresh environment forms a fresh cluster: a restored membership is not 'ok' at once, and
    # create refuses nodes that hold data. (A single node that a test crashed is started again
    # with its data and membership by revive_cluster_node.)
    rm -rf "$DATA/redis-cluster/$p/nodes.conf" "$DATA/redis-cluster/$p/appendonlydir"
    # The config file carries the password so that it never shows up in `ps`. AOF on, fsync
    # every second, as production runs it (the cluster restart fault test relies on it).
    cat >"$DATA/redis-cluster/$p/redis.conf" <<CONF
bind 127.0.0.1
port $p
dir $DATA/redis-cluster/$p
save ""
appendonly yes
appendfsync everysec
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout 3000
requirepass $pass
masterauth $pass
CONF
    chmod 600 "$DATA/redis-cluster/$p/redis.conf"
    spawn redis-cluster "redis-cluster-$p" redis-server "$DATA/redis-cluster/$p/redis.conf"
  done
  for p in "${all[@]}"; do
    wait_for redis-cluster 20 env REDISCLI_AUTH="$pass" redis-cli -p "$p" ping
  done
  local nodes=()
  for p in "${all[@]}"; do nodes+=("127.0.0.1:$p"); done
  # On one host, redis-cli makes the first three masters and the last three their replicas.
  REDISCLI_AUTH="$pass" redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
    >>"$LOGS/redis-cluster-create.log" 2>&1 || die "redis-cli --cluster create failed (log: $LOGS/redis-cluster-create.log)"
  cluster_ok() { REDISCLI_AUTH="$pass" redis-cli -p "$1" cluster info | grep -q 'cluster_state:ok'; }
  for p in "${all[@]}"; do wait_for redis-cluster 30 cluster_ok "$p"; done
  # Every replica attached and in sync, so that a test can fail a master over at once.
  replica_synced() { REDISCLI_AUTH="$pass" redis-cli -p "$1" info replication | grep -q 'master_link_status:up'; }
  for p in "${PORTS_REDIS_CLUSTER_REPLICAS[@]}"; do wait_for redis-cluster 30 replica_synced "$p"; done
}

# revive_cluster_node PORT: start one node of the running cluster again after a test killed it;
# it keeps its AOF data and nodes.conf, so it rejoins (as a replica if it was failed over).
revive_cluster_node() {
  local port="$1" pass f pid live=""
  [[ " ${PORTS_REDIS_CLUSTER[*]} ${PORTS_REDIS_CLUSTER_REPLICAS[*]} " == *" $port "* ]] \
    || die "$port is not a Redis Cluster port (${PORTS_REDIS_CLUSTER[*]} ${PORTS_REDIS_CLUSTER_REPLICAS[*]})"
  [[ -f "$DATA/redis-cluster/$port/redis.conf" ]] || die "no Redis Cluster node was started on $port"
  port_free "$port" || die "the Redis Cluster node on $port is running"
  # Forget the dead process, so that `running redis-cluster` is true again afterwards.
  f="$(pidfile redis-cluster)"
  for pid in $(cat "$f" 2>/dev/null); do alive "$pid" && live+="$pid"$'\n'; done
  printf '%s' "$live" >"$f"
  spawn redis-cluster "redis-cluster-$port" redis-server "$DATA/redis-cluster/$port/redis.conf"
  pass="$(secret redis_cluster_password)"
  wait_for redis-cluster 20 env REDISCLI_AUTH="$pass" redis-cli -p "$port" ping
}

# prometheus_rbac: a read-only identity for the pod discovery of the end-to-end tests'
# Prometheus (the token is in tokens.csv; this grants list/watch of pods and nothing else).
prometheus_rbac() {
  secret prometheus_token >"$QP_RUN/prometheus-token"
  chmod 600 "$QP_RUN/prometheus-token"
  "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" apply -f - >/dev/null <<'RBAC'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "qp:prometheus"}
rules:
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "qp:prometheus"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "qp:prometheus"}
subjects: [{kind: Group, name: "qp:prometheus", apiGroup: rbac.authorization.k8s.io}]
RBAC
}

# Debian ships the console helper libraries as documentation examples.
console_libraries() {
  local d
  for d in /usr/share/prometheus/console_libraries /usr/share/doc/prometheus/examples/console_libraries; do
    [[ -f "$d/prom.lib" ]] && { echo "$d"; return; }
  done
  echo /usr/share/doc/prometheus/examples/console_libraries
}

start_prometheus() {
  require_ports prometheus "$PORT_PROMETHEUS"
  mkdir -p "$QP_RUN/prometheus/targets" "$QP_RUN/prometheus/rules" "$DATA/prometheus"
  # Targets are file_sd JSON files that tests and local mode drop in; rules likewise. The chart's
  # alert rules and console templates are linked in when present (issue 7 extends this).
  cat >"$QP_RUN/prometheus/prometheus.yml" <<PROM
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files:
  - $QP_RUN/prometheus/rules/*.yml
scrape_configs:
  - job_name: prometheus
    static_configs: [{targets: ["127.0.0.1:$PORT_PROMETHEUS"]}]
  - job_name: queue-processor
    file_sd_configs:
      - files: ["$QP_RUN/prometheus/targets/*.json"]
        refresh_interval: 1s
PROM

  local consoles="$QP_ROOT/charts/queue-processor/consoles"
  [[ -d "$consoles" ]] || consoles="/usr/share/prometheus/consoles"
  # The project's alert rules are live in the local Prometheus, as a user's would be.
  ln -sf "$QP_ROOT/charts/queue-processor/files/alerts.yaml" "$QP_RUN/prometheus/rules/queue-processor.yml"
  spawn prometheus prometheus prometheus --config.file "$QP_RUN/prometheus/prometheus.yml" \
    --storage.tsdb.path "$DATA/prometheus" --web.listen-address "127.0.0.1:$PORT_PROMETHEUS" \
    --web.enable-lifecycle --web.console.templates "$consoles" \
    --web.console.libraries "$(console_libraries)" --log.level warn
  wait_for prometheus 30 curl -fsS "http://127.0.0.1:$PORT_PROMETHEUS/-/ready"
}

# ---------------------------------------------------------------------------------------------
# The env file: every address a test or tool needs.

write_env() {
  mkdir -p "$QP_RUN"
  local cluster_nodes="" p pass
  pass="$(secret redis_cluster_password)"
  for p in "${PORTS_REDIS_CLUSTER[@]}" "${PORTS_REDIS_CLUSTER_REPLICAS[@]}"; do cluster_nodes+="${cluster_nodes:+,}redis://127.0.0.1:$p"; done
  cat >"$QP_ENV_FILE.tmp" <<ENV
# Written by hack/env.sh; read by tests, benchmarks and the demo. Do not edit.
QP_ROOT=$QP_ROOT
QP_RUN=$QP_RUN
QP_CACHE=$QP_CACHE
KUBECONFIG=$KUBECONFIG_FILE
QP_KUBE_APISERVER=https://$NODE_IP:$PORT_APISERVER
QP_ETCD=http://127.0.0.1:$PORT_ETCD
QP_KAFKA_BOOTSTRAP=127.0.0.1:$PORT_KAFKA
QP_KAFKA_LIBS=$KAFKA_LIBS
QP_ENV_KAFKA_SASL_BOOTSTRAP=127.0.0.1:$PORT_KAFKA_SASL
QP_ENV_KAFKA_SASL_USER=qp-client
QP_ENV_KAFKA_SASL_PASSWORD=$(secret kafka_scram_password)
QP_ENV_KAFKA_CA=$QP_RUN/tls/ca.crt
QP_REDIS_URL=redis://127.0.0.1:$PORT_REDIS
QP_ENV_REDIS_TLS_URL=rediss://127.0.0.1:$PORT_REDIS_TLS
QP_ENV_REDIS_USER=qp-app
QP_ENV_REDIS_PASSWORD=$(secret redis_app_password)
QP_ENV_SERVICES_CA=$QP_RUN/tls/ca.crt
QP_REDIS_CLUSTER_NODES=$cluster_nodes
QP_REDIS_CLUSTER_PASSWORD=$pass
QP_PROMETHEUS_URL=http://127.0.0.1:$PORT_PROMETHEUS
QP_PROMETHEUS_TARGETS=$QP_RUN/prometheus/targets
QP_PROMETHEUS_RULES=$QP_RUN/prometheus/rules
QP_PROMETHEUS_CONSOLE_LIBRARIES=$(console_libraries)
QP_KUBECTL=$K8S_BIN/kubectl
QP_HELM=$HELM_BIN/helm
QP_K8S_VERSION=$K8S_VERSION
QP_ENV_SCRIPT=$QP_ROOT/hack/env.sh
ENV
  # The node: addresses that pods (not host tools) use, and what the e2e tests need to know.
  if node_network_up; then
    cat >>"$QP_ENV_FILE.tmp" <<ENV
QP_NODE_NAME=$NODE_NAME
QP_NODE_IP=$NODE_IP
QP_NODE_TAINT=$NODE_TAINT
QP_POD_CIDR=$POD_CIDR
QP_POD_KAFKA_BOOTSTRAP=$NODE_IP:$PORT_KAFKA_POD
QP_POD_KAFKA_SASL_BOOTSTRAP=$NODE_IP:$PORT_KAFKA_SASL_POD
QP_POD_REDIS_TLS_URL=rediss://$NODE_IP:$PORT_REDIS_TLS
QP_POD_REDIS_URL=redis://$NODE_IP:$PORT_REDIS
QP_CONTAINERD_SOCK=$CONTAINERD_SOCK
QP_KUBE_CA=$CERTS/ca.crt
QP_PROMETHEUS_SD_BIN=$PROMETHEUS_SD_BIN/prometheus
QP_PROMETHEUS_SD_TOKEN_FILE=$QP_RUN/prometheus-token
ENV
  fi
  chmod 600 "$QP_ENV_FILE.tmp"
  mv "$QP_ENV_FILE.tmp" "$QP_ENV_FILE"
}

start_one() {
  local svc="$1"
  if running "$svc"; then return 0; fi
  rm -f "$(pidfile "$svc")"
  log "starting $svc"
  local t=$SECONDS
  case "$svc" in
    node-network) start_node_network ;;
    etcd) start_etcd ;;
    kube-apiserver) start_kube_apiserver ;;
    kube-controller-manager) start_kube_controller_manager ;;
    kube-scheduler) start_kube_scheduler ;;
    containerd) start_containerd ;;
    kubelet) start_kubelet ;;
    kube-proxy) start_kube_proxy ;;
    kafka) start_kafka ;;
    kafka-broker2) start_kafka_broker2 ;;
    redis) start_redis ;;
    redis-cluster) start_redis_cluster ;;
    prometheus) start_prometheus ;;
    *) die "unknown service '$svc' (known: ${ALL_SERVICES[*]})" ;;
  esac
  log "$svc ready in $((SECONDS - t))s"
}

version_of() {
  case "$1" in
    etcd) "$ETCD_BIN/etcd" --version 2>/dev/null | head -1 | awk '{print $3}' ;;
    kube-apiserver) "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" get --raw /version 2>/dev/null \
      | grep -o '"gitVersion": *"[^"]*"' | cut -d'"' -f4 ;;
    kube-controller-manager | kube-scheduler | kube-proxy | kubelet) "$K8S_BIN/$1" --version 2>/dev/null | awk '{print $2}' ;;
    containerd) containerd --version | awk '{print $3}' ;;
    node-network) echo "$POD_BRIDGE" ;;
    kafka) echo "$KAFKA_VERSION (KRaft)" ;;
    redis) redis-cli -p "$PORT_REDIS" info server 2>/dev/null | grep redis_version | cut -d: -f2 | tr -d '\r' ;;
    redis-cluster) echo "$(REDISCLI_AUTH="$(secret redis_cluster_password)" redis-cli -p "${PORTS_REDIS_CLUSTER[0]}" info server 2>/dev/null \
      | grep redis_version | cut -d: -f2 | tr -d '\r'), 3 masters + 3 replicas" ;;
    prometheus) curl -fsS "http://127.0.0.1:$PORT_PROMETHEUS/api/v1/status/buildinfo" 2>/dev/null \
      | grep -o '"version":"[^"]*"' | cut -d'"' -f4 ;;
  esac
}

address_of() {
  case "$1" in
    etcd) echo "http://127.0.0.1:$PORT_ETCD" ;;
    kube-apiserver) echo "https://$NODE_IP:$PORT_APISERVER (kubeconfig: $KUBECONFIG_FILE)" ;;
    kube-controller-manager) echo "https://127.0.0.1:$PORT_KCM/healthz" ;;
    kube-scheduler) echo "https://127.0.0.1:$PORT_SCHEDULER/healthz" ;;
    node-network) echo "node $NODE_IP, pods $POD_CIDR on $POD_BRIDGE" ;;
    containerd) echo "$CONTAINERD_SOCK" ;;
    kubelet) echo "node $NODE_NAME, https://$NODE_IP:$PORT_KUBELET" ;;
    kube-proxy) echo "iptables mode, http://127.0.0.1:$PORT_PROXY_HEALTHZ/healthz" ;;
    kafka) echo "127.0.0.1:$PORT_KAFKA, SASL_SSL 127.0.0.1:$PORT_KAFKA_SASL$(node_network_up && echo ", pods: $NODE_IP:$PORT_KAFKA_POD, SASL_SSL $NODE_IP:$PORT_KAFKA_SASL_POD")" ;;
    redis) echo "redis://127.0.0.1:$PORT_REDIS, TLS rediss://127.0.0.1:$PORT_REDIS_TLS (user qp-app)$(node_network_up && echo ", pods: $NODE_IP")" ;;
    redis-cluster) echo "127.0.0.1:${PORTS_REDIS_CLUSTER[0]}-${PORTS_REDIS_CLUSTER[2]}, replicas ${PORTS_REDIS_CLUSTER_REPLICAS[0]}-${PORTS_REDIS_CLUSTER_REPLICAS[2]} (password in $SECRETS_FILE)" ;;
    prometheus) echo "http://127.0.0.1:$PORT_PROMETHEUS" ;;
  esac
}

status() {
  local svc rc=0
  printf '%-24s %-8s %-22s %s\n' SERVICE STATE VERSION ADDRESS
  for svc in "${ALL_SERVICES[@]}"; do
    if running "$svc"; then
      printf '%-24s %-8s %-22s %s\n' "$svc" up "$(version_of "$svc")" "$(address_of "$svc")"
    else
      printf '%-24s %-8s %-22s %s\n' "$svc" down - "$(address_of "$svc")"
      rc=1
    fi
  done
  if running kubelet && running kube-apiserver; then
    echo
    "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" get nodes -o wide 2>/dev/null | cut -c1-110 || true
    echo "images on the node:"
    ctr_ images ls -q 2>/dev/null | grep -v '^sha256:' | sed 's/^/  /'
    echo "pods: $("$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" get pods -A --no-headers 2>/dev/null | wc -l)"
  fi
  [[ -f "$QP_ENV_FILE" ]] && echo "env file: $QP_ENV_FILE"
  return $rc
}

cmd="${1:-}"; shift || true
services=("$@")
[[ ${#services[@]} -eq 0 ]] && services=("${ALL_SERVICES[@]}")

case "$cmd" in
  up)
    install_all "${services[@]}"
    started=()
    # Nothing half-started: if any service fails, stop the ones this call started.
    trap 'rc=$?; if ((rc != 0)); then for s in "${started[@]}"; do stop_service "$s"; done; fi' EXIT
    for s in "${services[@]}"; do
      running "$s" || started+=("$s")
      start_one "$s"
    done
    if [[ " ${services[*]} " == *" kubelet "* ]]; then
      t=$SECONDS
      wait_node_ready
      log "node $NODE_NAME Ready in $((SECONDS - t))s"
    fi
    write_env
    trap - EXIT
    ;;
  start)
    for s in "${services[@]}"; do start_one "$s"; done
    write_env
    ;;
  down | stop)
    # Pods first, while the kubelet can still stop them; then in reverse start order; then
    # what the node changed on the host.
    [[ " ${services[*]} " == *" kubelet "* ]] && node_delete_pods
    # A second broker without its controller is of no use: it goes with kafka.
    [[ " ${services[*]} " == *" kafka "* ]] && stop_service kafka-broker2
    for ((i = ${#services[@]} - 1; i >= 0; i--)); do
      if [[ "${services[$i]}" != node-network ]] && { running "${services[$i]}" || [[ -f "$(pidfile "${services[$i]}")" ]]; }; then
        log "stopping ${services[$i]}"
        stop_service "${services[$i]}"
      fi
    done
    if [[ " ${services[*]} " == *" node-network "* ]]; then
      node_cleanup
      if ! node_leftovers >&2; then die "the node left traces on the host (above)"; fi
    fi
    ;;
  build-deps) mkdir -p "$QP_CACHE/build"; apt_install ;;
  leftovers) node_leftovers ;;
  revive-cluster-node) revive_cluster_node "${services[0]:?usage: hack/env.sh revive-cluster-node PORT}" ;;
  load-image) load_image "${services[0]:?usage: hack/env.sh load-image FILE}" ;;
  status) status ;;
  is-up)
    for s in "${services[@]}"; do running "$s" || exit 1; done
    ;;
  *)
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
