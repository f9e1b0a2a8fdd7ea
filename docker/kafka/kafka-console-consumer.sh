#!/bin/sh
# The official image's console consumer, at the same path (/opt/kafka/bin).
exec java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
  -Dlog4j2.configurationFile=/opt/kafka/log4j2-tools.properties -cp "/opt/kafka/libs/*" \
  org.apache.kafka.tools.consumer.ConsoleConsumer "$@"
