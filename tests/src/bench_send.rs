//! The windowed sender shared by the benchmark binaries (`client_bench`,
//! `bulk_send`): the `hush` CLI's driver sending text after text while
//! keeping at most a window of them unconfirmed by the relay.

use hush_cli::CliError;
use hush_cli::driver::{Discard, Driver};
use hush_client::{Command, MessageState, Reply, Storage};
use hush_protocol::ConversationId;
use std::time::Duration;

/// Whether the relay has durably stored the message (or more).
fn confirmed(state: Option<MessageState>) -> bool {
    matches!(
        state,
        Some(MessageState::Stored | MessageState::Delivered | MessageState::Read)
    )
}

/// Send `count` texts `"{label}{n:08} {body}"` into `conversation`, keeping
/// at most `window` unconfirmed by the relay; returns once all are stored.
pub async fn send_all<S: Storage + Send + 'static>(
    d: &mut Driver<S>,
    conversation: ConversationId,
    count: usize,
    label: &str,
    body: &str,
    window: usize,
) -> Result<(), CliError> {
    let mut queued = 0usize;
    let mut ids = Vec::with_capacity(count);
    let mut done = 0usize;
    while done < count {
        let room = window.saturating_sub(queued - done);
        let batch = room.min(count - queued).min(256);
        if batch > 0 {
            let cmds = (0..batch)
                .map(|i| Command::SendText {
                    conversation,
                    text: format!("{label}{:08} {body}", queued + i),
                })
                .collect();
            for r in d.commands(cmds, &mut Discard).await? {
                if let Some(Reply::Message(id)) = r {
                    ids.push(id);
                }
            }
            queued += batch;
        }
        // Run until the oldest unconfirmed message is stored (or a moment passes).
        let mut stop = None;
        let oldest = ids.get(done).copied();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        d.run_until(deadline, &mut stop, &mut Discard, |v| {
            oldest.is_none_or(|id| confirmed(v.engine.message_state(&id)))
        })
        .await?;
        while let Some(id) = ids.get(done) {
            match d.engine().message_state(id) {
                Some(MessageState::Failed) => {
                    return Err(CliError::Transport("a message failed".into()));
                }
                s if confirmed(s) => done += 1,
                _ => break,
            }
        }
    }
    Ok(())
}
