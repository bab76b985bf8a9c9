/*
 * Tally gateway recipe for Java: publish metering events to Kafka, one event per message,
 * keyed by the account (the CloudEvents `subject`), as docs/api.md#partitioning requires.
 *
 * Run it as it is (JDK 11+ single-file source launch, no build), from the repository root:
 *
 *   java -cp '.tally/kafka/libs/*' docs/recipes/java/TallyRecorder.java \
 *        <bootstrap> <topic> <source> <requests-per-account> <account> [<account>...]
 *
 * It sends, for every account, that many `tally.request.v1` events and one stream (a
 * `tally.stream.opened.v1` and its `tally.stream.closed.v1`), then prints one JSON line per
 * event Kafka acknowledged: {"partition": p, "offset": o, "event": {...}}.
 *
 * In a gateway, copy the `TallyRecorder` class: make one per process, call `request(...)`
 * for every API request (including the one that opens a stream), `streamOpened(...)` /
 * `streamClosed(...)` around streams, and `close()` on shutdown. It needs kafka-clients
 * and jackson-databind (any JSON library will do: the wire format is in
 * schemas/event.schema.json).
 *
 * The rules it follows:
 * - key = subject (UTF-8) and Kafka's default partitioner: murmur2 of the key, the same
 *   partition the Python gateway library computes, so an account's events share one
 *   partition whichever gateway sent them;
 * - a fresh random `id` per event, kept when the same event is re-sent: (source, id) is
 *   how Tally counts a re-sent event once;
 * - `time` = when it happened at the gateway, RFC 3339 in UTC (e.g. 2026-03-29T01:02:03.456Z);
 * - acks=all and an idempotent producer, so broker-side retries never duplicate a message.
 */

import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.Future;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class TallyRecorder implements AutoCloseable {
    public static final String REQUEST = "tally.request.v1";
    public static final String STREAM_OPENED = "tally.stream.opened.v1";
    public static final String STREAM_CLOSED = "tally.stream.closed.v1";
    private static final byte[] CONTENT_TYPE =
            "application/cloudevents+json".getBytes(StandardCharsets.UTF_8);
    private static final ObjectMapper JSON = new ObjectMapper();

    private final KafkaProducer<String, byte[]> producer;
    private final String topic;
    private final String source;

    /** @param source this gateway instance, 1-256 chars, e.g. "gw-eu-1" */
    public TallyRecorder(String bootstrap, String topic, String source) {
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
        // Leave partitioner.class unset: with a key, Kafka's built-in partitioner picks
        // toPositive(murmur2(key)) % partitions, which is what Tally's consumers expect.
        props.put(ProducerConfig.PARTITIONER_IGNORE_KEYS_CONFIG, false);
        props.put(ProducerConfig.LINGER_MS_CONFIG, 5);
        props.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        this.producer = new KafkaProducer<>(props);
        this.topic = topic;
        this.source = source;
    }

    /** One API request; `units` is its cost against the account's limits (default 1). */
    public Future<RecordMetadata> request(
            String subject, double units, String route, String method, int status, double latencyMs) {
        ObjectNode data = JSON.createObjectNode();
        data.put("units", units);
        data.put("route", route);
        data.put("method", method);
        data.put("status", status);
        data.put("latency_ms", latencyMs);
        return send(envelope(REQUEST, subject, data));
    }

    /** A stream starts counting against the account's concurrent streams. */
    public Future<RecordMetadata> streamOpened(String subject, String streamId, String route) {
        ObjectNode data = JSON.createObjectNode();
        data.put("stream_id", streamId);
        data.put("route", route);
        return send(envelope(STREAM_OPENED, subject, data));
    }

    /** The stream ended (same stream id), having cost `units`. */
    public Future<RecordMetadata> streamClosed(
            String subject, String streamId, double units, double durationMs, String reason) {
        ObjectNode data = JSON.createObjectNode();
        data.put("stream_id", streamId);
        data.put("units", units);
        data.put("duration_ms", durationMs);
        data.put("reason", reason);
        return send(envelope(STREAM_CLOSED, subject, data));
    }

    /** Sends a ready event as it is, e.g. one re-sent with its original id after a failure. */
    public Future<RecordMetadata> send(ObjectNode event) {
        String subject = event.get("subject").asText();
        byte[] value;
        try {
            value = JSON.writeValueAsBytes(event);
        } catch (Exception e) {
            throw new IllegalArgumentException("event cannot be encoded as JSON: " + e, e);
        }
        ProducerRecord<String, byte[]> record = new ProducerRecord<>(topic, subject, value);
        record.headers().add("content-type", CONTENT_TYPE);
        return producer.send(record);
    }

    public ObjectNode envelope(String type, String subject, ObjectNode data) {
        ObjectNode event = JSON.createObjectNode();
        event.put("specversion", "1.0");
        event.put("id", UUID.randomUUID().toString().replace("-", ""));
        event.put("source", source);
        event.put("type", type);
        event.put("subject", subject);
        // Millisecond precision keeps the fraction digits fixed: 2026-03-29T01:02:03.456Z.
        event.put("time", Instant.now().truncatedTo(ChronoUnit.MILLIS).toString());
        event.set("data", data);
        return event;
    }

    /** Waits until every event sent so far is acknowledged (or failed). */
    public void flush() {
        producer.flush();
    }

    @Override
    public void close() {
        producer.close(); // flushes first
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 5) {
            System.err.println(
                    "usage: TallyRecorder <bootstrap> <topic> <source> <requests-per-account>"
                            + " <account> [<account>...]");
            System.exit(2);
        }
        String bootstrap = args[0], topic = args[1], source = args[2];
        int perAccount = Integer.parseInt(args[3]);
        List<String> accounts = Arrays.asList(args).subList(4, args.length);

        List<ObjectNode> sent = new ArrayList<>();
        List<Future<RecordMetadata>> acks = new ArrayList<>();
        try (TallyRecorder recorder = new TallyRecorder(bootstrap, topic, source)) {
            for (String account : accounts) {
                for (int i = 0; i < perAccount; i++) {
                    ObjectNode data = JSON.createObjectNode();
                    data.put("units", 1 + i % 3);
                    data.put("route", "/v1/messages");
                    data.put("method", "POST");
                    data.put("status", i % 10 == 9 ? 429 : 200);
                    data.put("latency_ms", 12.5 + i);
                    ObjectNode event = recorder.envelope(REQUEST, account, data);
                    sent.add(event);
                    acks.add(recorder.send(event));
                }
                String streamId = UUID.randomUUID().toString();
                ObjectNode opened = JSON.createObjectNode();
                opened.put("stream_id", streamId);
                opened.put("route", "/v1/chat");
                ObjectNode closed = JSON.createObjectNode();
                closed.put("stream_id", streamId);
                closed.put("units", 42.5);
                closed.put("duration_ms", 1500.0);
                closed.put("reason", "completed");
                for (ObjectNode event :
                        List.of(
                                recorder.envelope(STREAM_OPENED, account, opened),
                                recorder.envelope(STREAM_CLOSED, account, closed))) {
                    sent.add(event);
                    acks.add(recorder.send(event));
                }
            }
            recorder.flush();
            for (int i = 0; i < sent.size(); i++) {
                RecordMetadata meta = acks.get(i).get(); // throws if Kafka refused it
                ObjectNode line = JSON.createObjectNode();
                line.put("partition", meta.partition());
                line.put("offset", meta.offset());
                line.set("event", sent.get(i));
                System.out.println(JSON.writeValueAsString(line));
            }
        }
    }
}
