#!/bin/sh
# The official image's broker API versions tool, at the same path (/opt/kafka/bin): what
# docker-compose.yml's health check runs.
exec java -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
  -Dlog4j2.configurationFile=/opt/kafka/log4j2-tools.properties -cp "/opt/kafka/libs/*" \
  org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
