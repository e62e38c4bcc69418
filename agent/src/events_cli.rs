//! `postern events tail`: read an edge's events from Kafka and print them
//! as JSON lines.
//!
//! ```text
//! postern events tail --brokers kafka:9092 --from-beginning
//! postern events tail --brokers kafka:9092 --type http_request_complete.v0 \
//!     --filter 'ev.conn.server_name == "app.example.com"' --group ops
//! ```

use anyhow::Context;
use clap::{Args, Subcommand};
use postern_events::{DEFAULT_TOPIC, EventType, Filter, TailOptions, topic_name};

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print events from Kafka as JSON lines, one per event.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Kafka bootstrap brokers, host:port[,host:port...].
    #[arg(long)]
    brokers: String,
    /// Only this event type (repeatable): http_request_complete.v0,
    /// tcp_connection_closed.v0. Default: both.
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// Only events this CEL expression matches, as in a subscription:
    /// 'ev.conn.server_name == "app.example.com"'.
    #[arg(long)]
    filter: Option<String>,
    /// Topic to read (repeatable). Default: the edge's default topic of
    /// each type, postern.<type>.
    #[arg(long = "topic", value_name = "TOPIC")]
    topics: Vec<String>,
    /// Consumer group; its committed offsets say where the next tail in
    /// the same group resumes. Default: a new group for each run.
    #[arg(long)]
    group: Option<String>,
    /// Start at the oldest event when the group has no offsets yet
    /// (default: only events that arrive from now on).
    #[arg(long)]
    from_beginning: bool,
    /// Exit after printing this many events.
    #[arg(long)]
    max_events: Option<u64>,
    /// Another librdkafka consumer setting, key=value (repeatable), e.g.
    /// -X security.protocol=sasl_ssl -X sasl.mechanism=PLAIN.
    #[arg(short = 'X', long = "property", value_name = "KEY=VALUE", value_parser = property)]
    properties: Vec<(String, String)>,
}

fn property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

pub async fn run(command: EventsCommand) -> anyhow::Result<()> {
    match command {
        EventsCommand::Tail(args) => tail(args).await,
    }
}

async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let types = args
        .types
        .iter()
        .map(|t| {
            EventType::parse(t).with_context(|| {
                format!(
                    "--type: ERR_POSTERN_238: unknown event type {t:?}; Postern publishes {} and {} (ngrok: ERR_NGROK_238)",
                    postern_events::HTTP_REQUEST_COMPLETE,
                    postern_events::TCP_CONNECTION_CLOSED
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let filter = args
        .filter
        .as_deref()
        .map(Filter::compile)
        .transpose()
        .context(
            "--filter: ERR_POSTERN_6013: the filter does not compile (ngrok: ERR_NGROK_6013)",
        )?;
    let topics = if args.topics.is_empty() {
        let wanted = if types.is_empty() {
            EventType::ALL.to_vec()
        } else {
            types.clone()
        };
        wanted
            .into_iter()
            .map(|t| topic_name(DEFAULT_TOPIC, t))
            .collect()
    } else {
        args.topics
    };
    let options = TailOptions {
        brokers: args.brokers,
        topics,
        group: args
            .group
            .unwrap_or_else(|| format!("postern-tail-{:016x}", rand::random::<u64>())),
        from_beginning: args.from_beginning,
        types,
        filter,
        max_events: args.max_events,
        properties: args.properties,
    };
    let stop =
        postern_net::shutdown_signal().context("installing the SIGTERM and SIGINT handlers")?;
    let mut out = std::io::stdout();
    postern_events::tail(&options, &mut out, stop).await?;
    Ok(())
}
