#!/usr/bin/env bash
# Fetches Apache Kafka (broker + KRaft controller) and its runtime dependencies from Maven Central
# with Maven's own resolver, into a versioned cache directory. Started later with `java -cp`.
source "$(dirname "$0")/lib.sh"

[[ -f "$KAFKA_LIBS/.complete" ]] && exit 0
need java "apt-get install openjdk-17-jre-headless"
need mvn "apt-get install maven"

work="$QP_CACHE/build/kafka-$KAFKA_VERSION-log4j-$LOG4J_VERSION"
mkdir -p "$work" "$KAFKA_LIBS"
cat >"$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.qp</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <!-- Kafka 4 logs through slf4j 1.x to log4j2; this is the matching binding. -->
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
fetch() {
  cd "$work"
  mvn -B -q dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS" -DincludeScope=runtime
}
run_logged "fetching Kafka $KAFKA_VERSION jars from Maven Central (first time only)" "$work/fetch.log" fetch
touch "$KAFKA_LIBS/.complete"
log "Kafka $KAFKA_VERSION: $(ls "$KAFKA_LIBS" | wc -l) jars in $KAFKA_LIBS"
