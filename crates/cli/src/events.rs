//! `switchboard events ...`: operate the event bus by hand.
//!
//! - `publish TYPE JSON`: exits 0 only once the backend accepted the event.
//! - `tail TYPE...`: one line per event (`type id data`); with `--group`, a
//!   durable group that resumes where it stopped; without, a throwaway group
//!   that starts at the newest event and is deleted on exit. An event is
//!   acked only once its line is on stdout; what was fetched but not printed
//!   when `tail` stops (`--count` reached, Ctrl-C) is handed back to the
//!   group, so the next run prints it at once.
//! - `dlq list` / `dlq replay`: the dead-letter topic's retained letters, and
//!   re-publishing them to the topics they came from.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use switchboard_bus::deadletter::DeadLetter;
use switchboard_bus::subscribe::DEFAULT_DEAD_LETTER_TOPIC;
use switchboard_bus::{Bus, Event, HandlerError, Nack, SubscribeOptions};

/// Arguments of `switchboard events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Bus URL: memory://, redis://HOST:PORT, redis+pubsub://HOST:PORT or nats://HOST:PORT.
    #[arg(
        long,
        env = "SWITCHBOARD_BUS",
        global = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    bus: String,
    #[command(subcommand)]
    command: EventsCommand,
}

/// What to do with the bus.
#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// Publishes one event; exits 0 once the backend accepted it.
    Publish {
        /// The event type (also its topic).
        #[arg(value_name = "TYPE")]
        ty: String,
        /// The event data, as JSON.
        json: String,
        /// The event source.
        #[arg(long, default_value = "/switchboard/cli")]
        source: String,
        /// The event id (default: a fresh UUIDv7).
        #[arg(long)]
        id: Option<String>,
    },
    /// Prints events as they arrive: one line each, `type id data`.
    Tail {
        /// Event types (topics) to follow.
        #[arg(value_name = "TYPE", required = true)]
        types: Vec<String>,
        /// Read as this durable consumer group, resuming where it stopped.
        #[arg(long)]
        group: Option<String>,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Lists or replays dead letters.
    Dlq {
        /// The dead-letter topic.
        #[arg(long, default_value = DEFAULT_DEAD_LETTER_TOPIC)]
        topic: String,
        #[command(subcommand)]
        action: DlqAction,
    },
}

/// `events dlq` actions.
#[derive(Debug, clap::Subcommand)]
pub enum DlqAction {
    /// Lists retained dead letters, oldest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Re-publishes dead letters to the topics they came from (every group of
    /// that topic sees them again); stops once none arrived for `--idle`.
    Replay {
        /// The durable group that remembers which letters were replayed.
        #[arg(long, default_value = "switchboard-dlq-replay")]
        group: String,
        /// Stop after this long without a dead letter.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        idle: Duration,
    },
}

/// Runs an `events` subcommand.
pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let bus = Bus::open(&args.bus)
            .await
            .with_context(|| format!("opening bus {}", args.bus))?;
        match args.command {
            EventsCommand::Publish {
                ty,
                json,
                source,
                id,
            } => publish(&bus, ty, &json, source, id).await,
            EventsCommand::Tail {
                types,
                group,
                count,
            } => tail(&bus, &types, group, count).await,
            EventsCommand::Dlq { topic, action } => match action {
                DlqAction::List { limit } => dlq_list(&bus, &topic, limit).await,
                DlqAction::Replay { group, idle } => dlq_replay(&bus, &topic, &group, idle).await,
            },
        }
    })
}

async fn publish(
    bus: &Bus,
    ty: String,
    json: &str,
    source: String,
    id: Option<String>,
) -> anyhow::Result<()> {
    let data: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("event data is not JSON: {json}"))?;
    let mut builder = Event::builder().source(source).ty(ty).data(&data);
    if let Some(id) = id {
        builder = builder.id(id);
    }
    let event = builder.build().context("building the event")?;
    bus.publish(event.clone())
        .await
        .with_context(|| format!("publishing to {}", bus.url()))?;
    println!("{}", event.id());
    Ok(())
}

/// `type id data` on one line.
fn line(event: &Event) -> String {
    let data = match event.data() {
        None => "null".to_owned(),
        Some(switchboard_bus::Data::Json(raw)) => raw.get().replace('\n', " "),
        Some(switchboard_bus::Data::Binary(b)) => format!("<{} bytes>", b.len()),
    };
    format!("{} {} {}", event.ty(), event.id(), data)
}

/// A line for the printer, and where it says the line is on stdout.
type Printed = (String, tokio::sync::oneshot::Sender<()>);

async fn tail(
    bus: &Bus,
    types: &[String],
    group: Option<String>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let throwaway = group.is_none();
    let group = group.unwrap_or_else(|| format!("tail-{}", std::process::id()));
    // A handler returns `Ok` (acks) only once its line is on stdout; an event
    // the printer did not take (the count was reached, Ctrl-C) is handed back
    // to the group, so the next `tail --group` prints it.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Printed>();
    let mut subs = Vec::new();
    for ty in types {
        let tx = tx.clone();
        let handler = move |event: Event| {
            let tx = tx.clone();
            async move {
                let (done, printed) = tokio::sync::oneshot::channel();
                let stopping = || HandlerError::from(Nack::release("tail is stopping"));
                tx.send((line(&event), done)).map_err(|_| stopping())?;
                printed.await.map_err(|_| stopping())
            }
        };
        let opts = SubscribeOptions::default()
            .max_in_flight(1)
            .start_at_latest(throwaway);
        let sub = bus
            .subscribe(ty, &group, handler, opts)
            .await
            .with_context(|| format!("subscribing to {ty}"))?;
        subs.push(sub);
    }
    drop(tx);
    let mut printed = 0;
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some((l, done)) = next else { break };
                writeln!(stdout, "{l}").context("writing to stdout")?;
                stdout.flush().context("writing to stdout")?;
                printed += 1;
                if count.is_some_and(|c| printed >= c) {
                    // Stop fetching before this event's handler acks it, so
                    // that no subscription takes another one meanwhile.
                    for sub in &subs {
                        sub.stop();
                    }
                    let _ = done.send(());
                    break;
                }
                let _ = done.send(());
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Lines not printed: their handlers see the printer gone and, the
    // subscriptions being stopped, hand their events back.
    for sub in &subs {
        sub.stop();
    }
    drop(rx);
    for sub in subs {
        sub.shutdown().await;
    }
    if throwaway {
        for ty in types {
            // An abandoned group would hold back trimming.
            let _ = bus.delete_group(ty, &group).await;
        }
    }
    Ok(())
}

async fn dlq_list(bus: &Bus, topic: &str, limit: usize) -> anyhow::Result<()> {
    let letters = bus
        .peek(topic, limit)
        .await
        .with_context(|| format!("reading {topic}"))?;
    if letters.is_empty() {
        println!("no dead letters on {topic}");
        return Ok(());
    }
    println!("TOPIC\tGROUP\tREASON\tATTEMPTS\tID\tERROR");
    for letter in letters {
        match letter {
            Ok(event) => match DeadLetter::from_event(&event) {
                Some(d) => println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    d.topic,
                    d.group,
                    d.reason.as_str(),
                    d.attempts,
                    event.id(),
                    d.error.replace('\n', " ")
                ),
                None => println!("-\t-\t-\t-\t{}\tnot a dead letter", event.id()),
            },
            Err(e) => println!("-\t-\t-\t-\t-\tundecodable entry: {e}"),
        }
    }
    Ok(())
}

async fn dlq_replay(bus: &Bus, topic: &str, group: &str, idle: Duration) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let replayer = bus.clone();
    let handler = move |event: Event| {
        let (bus, tx) = (replayer.clone(), tx.clone());
        async move {
            let Some(letter) = DeadLetter::from_event(&event) else {
                let _ = tx.send(format!("skipped {}: not a dead letter", event.id()));
                return Ok(());
            };
            let Some(replay) = letter.replay_event() else {
                let _ = tx.send(format!(
                    "skipped {}: undecodable entry from {}",
                    event.id(),
                    letter.topic
                ));
                return Ok(());
            };
            let replay = replay?;
            bus.publish_to(&letter.topic, std::slice::from_ref(&replay))
                .await?;
            let _ = tx.send(format!("replayed {} to {}", replay.id(), letter.topic));
            Ok::<_, HandlerError>(())
        }
    };
    let sub = bus
        .subscribe(
            topic,
            group,
            handler,
            SubscribeOptions::default().max_in_flight(16),
        )
        .await
        .with_context(|| format!("subscribing to {topic}"))?;
    let mut n = 0;
    while let Ok(Some(l)) = tokio::time::timeout(idle, rx.recv()).await {
        println!("{l}");
        n += 1;
    }
    sub.shutdown().await;
    println!("{n} dead letters handled");
    if n == 0 && !bus.capabilities().durable {
        bail!(
            "the {} backend retains no dead letters to replay",
            bus.capabilities().backend
        );
    }
    Ok(())
}
