// How each session of a Node.js agent went, told to the dispatcher as livekit-agents for Python
// tells it: UpdateJobStatus (running, then succeeded or failed with the reason).
//
// @livekit/agents (1.9) sends no job status at all, so without this the dispatcher never sees a
// Node.js session start or end: a canary's failures, a smoke test's sessions, an instance's idle
// time (scale to zero) would be invisible. voicefleet's local runtime loads this file with
// `node --import` into each instance. The worker forks one job process per session (they inherit
// the flags, so this file runs there too):
// - in the worker, `child_process.fork` is wrapped: a job process's `startJobRequest` is the
//   session starting, its `done` message the session over, its exit before that a crash. The
//   status goes out on the worker's own connection: the first `worker_msg` event (its register
//   message) gives the worker's emitter and the message class.
// - in a job process, the error its entry function threw (logged as "error in entry function")
//   rides on its `done` message, so that the reason a session failed names it.
// - the worker pings, as livekit-agents for Python does: a draining @livekit/agents worker sends
//   nothing at all, and the dispatcher disconnects a worker silent for --worker-silence-timeout
//   (the worker then registers again as a new one, and the sessions it is finishing would be
//   taken for lost).
import childProcess from 'node:child_process';
import { EventEmitter } from 'node:events';
import { syncBuiltinESMExports } from 'node:module';

const JS_RUNNING = 1;
const JS_SUCCESS = 2;
const JS_FAILED = 3;
const CRASHED = 'job crashed'; // @livekit/agents' exit reason when the entry function threw
const PING_INTERVAL = 2500; // ms; as often as the worker reports its load when not draining

function entryError(text) {
  for (const line of text.split('\n')) {
    if (!line.includes('error in entry function')) continue;
    try {
      const err = JSON.parse(line).error ?? {};
      const message = typeof err.message === 'string' ? err.message : '';
      return `${err.type || 'Error'}: ${message}`.trim();
    } catch {
      return 'the entry function threw (see the instance log)';
    }
  }
  return '';
}

function inJobProcess() {
  let error = '';
  const write = process.stdout.write;
  process.stdout.write = function (chunk, ...rest) {
    if (!error) error = entryError(String(chunk));
    return write.call(this, chunk, ...rest);
  };
  const send = process.send;
  process.send = function (msg, ...rest) {
    if (msg && msg.case === 'done' && error) msg = { ...msg, voicefleetError: error };
    return send.call(this, msg, ...rest);
  };
}

function inWorker() {
  let worker = null;
  let Message = null;
  const emit = EventEmitter.prototype.emit;
  EventEmitter.prototype.emit = function (name, ...args) {
    if (name === 'worker_msg' && args[0] && typeof args[0].toBinary === 'function') {
      worker = this;
      Message = args[0].constructor;
      EventEmitter.prototype.emit = emit;
      const ping = () => {
        const value = { timestamp: BigInt(Date.now()) };
        worker.emit('worker_msg', new Message({ message: { case: 'ping', value } }));
      };
      setInterval(ping, PING_INTERVAL).unref();
    }
    return emit.call(this, name, ...args);
  };
  const report = (jobId, status, error = '') => {
    if (worker === null) return;
    const value = { jobId, status, error };
    worker.emit('worker_msg', new Message({ message: { case: 'updateJob', value } }));
  };

  const fork = childProcess.fork;
  childProcess.fork = function (modulePath, ...rest) {
    const child = fork.call(this, modulePath, ...rest);
    if (!String(modulePath).includes('job_proc_lazy_main')) return child;
    let jobId = '';
    let reason = '';
    let ended = false;
    const end = (error) => {
      if (!jobId || ended) return;
      ended = true;
      report(jobId, error ? JS_FAILED : JS_SUCCESS, error);
    };
    const send = child.send;
    child.send = function (msg, ...args) {
      if (msg && msg.case === 'startJobRequest' && !jobId) {
        jobId = msg.value?.runningJob?.job?.id ?? '';
        if (jobId) report(jobId, JS_RUNNING);
      }
      return send.call(this, msg, ...args);
    };
    child.on('message', (msg) => {
      if (msg && msg.case === 'exiting') reason = msg.value?.reason ?? '';
      if (msg && msg.case === 'done') {
        end(msg.voicefleetError || (reason === CRASHED ? 'the entry function threw' : ''));
      }
    });
    child.on('exit', (code, signal) => {
      end(signal ? `job process killed by ${signal}` : `job process exited with code ${code}`);
    });
    return child;
  };
  syncBuiltinESMExports();
}

if (typeof process.send === 'function') inJobProcess();
else inWorker();
