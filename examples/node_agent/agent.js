// A minimal LiveKit Agents (Node.js) agent: `node agent.js start` registers a worker and runs
// one session per dispatch. voicefleet runs it unchanged; it gives the worker its identity
// (LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET, LIVEKIT_AGENT_NAME_OVERRIDE) and its health
// port.
import { fileURLToPath } from 'node:url';
import { ServerOptions, cli, defineAgent } from '@livekit/agents';

export default defineAgent({
  entry: async (ctx) => {
    console.log(`session ${ctx.job.id} in room ${ctx.job.room?.name} (${process.env.VOICEFLEET_VERSION ?? 'local'})`);
    await ctx.connect();
    const participant = await ctx.waitForParticipant();
    console.log(`${participant.identity} joined`);
  },
});

// Job processes import this file for its default export: only the worker runs the CLI.
if (process.argv[1] === fileURLToPath(import.meta.url)) {
  cli.runApp(new ServerOptions({ agent: fileURLToPath(import.meta.url) }));
}
